"""What the preference and RL objectives share about the model: per-token log-probs through the lm_head in chunks
(model_token_logprobs), and the reference policy of DPO, KTO and GRPO (beta > 0): the policy as handed to the
trainer (a ReferencePolicy, made by reference_sync.synced_reference), as TRL 1.16 takes it."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from fasttune.kernels.token_logprobs import EXTRAS, logit_extras
from fasttune.sharding import is_sharded


def score_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major) of the nonzero entries of a (B, T) mask. Made on the host when a batch is collated,
    they select on the device what the boolean mask would (select_scored) without its sync: a boolean mask's
    output size is known only once the device has counted it, so the host would wait."""
    return mask.reshape(-1).nonzero().squeeze(1)


def select_scored(t: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """t[mask] for t of shape (B, T, ...) and a bool mask (B, T): the same rows, in the same order, taken with
    `positions` (score_positions of the mask) when given."""
    return t[mask] if positions is None else t.flatten(0, 1).index_select(0, positions)


def model_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score: torch.Tensor,
                         positions: torch.Tensor | None = None, *, last: int | None = None,
                         position_ids: torch.Tensor | None = None, temperature: float = 1.0,
                         media: dict | None = None, entropy: bool = False, extras: bool = False,
                         aux_out: list | None = None, output_router_logits: bool | None = None):
    """Per-token log-probabilities of a batch's own tokens under `model`: the one implementation the DPO, ORPO,
    KTO and GRPO objectives call (the lm_head part is CausalLM.token_logprobs: kernels/token_logprobs.py, or the
    streamed head of offload_lm_head).

    Args:
        model: fasttune's CausalLM (LoRA or not) or the transformers fallback (FallbackModel).
        input_ids: (B, T) int64 token ids; attention_mask: (B, T) 1 for real tokens, 0 for padding.
        score: (B, T) mask (bool or 0/1) of the tokens to score; the first token is never scored (no context).
        positions: score_positions(score[:, T - n:]), to select the scored tokens without a device sync.
        last: score only the last n = `last` tokens of each row (GRPO's completions; the lm_head then sees only
            those positions on the fallback too); None: n = T - 1, every token after the first.
        position_ids: (B, T) positions for the model (GRPO's left-padded rows: attention_mask.cumsum - 1); None:
            the model's default (0..T-1).
        temperature: the logits are divided by it before the softmax (GRPO scores at the sampling temperature).
        media: a vision-language model's image inputs for these rows (pixel_values, image_grid_thw, ...: what its
            forward takes), merged into the embeddings as its forward merges them (models/vision.py).
        entropy: also return each scored position's entropy (nats) of the temperature-scaled distribution, as TRL's
            `entropy_from_logits` (differentiable: GRPO's entropy bonus).
        extras: also return, without gradient, each scored token's kernels.token_logprobs.EXTRAS (TRL's DPO
            metrics and WPO weights: mean logit, first-argmax hit, log sum_v p_v^2) as (B, n, 3) float32.
    Returns: (B, n) float32: log p(input_ids[:, t] | input_ids[:, :t]) for the n scored columns t = T - n .. T - 1,
        0 where score is 0; with entropy=True, (log-probs, entropies), both (B, n) float32, 0 where score is 0; with
        extras=True, (log-probs, entropies, extras).
    aux_out: a list that gets the forward's MoE load-balancing loss (unweighted, differentiable) when the model
        computes one, as TRL's DPO / KTO / GRPO / RLOO add it; output_router_logits: whether it does (on a mixture
        of experts; None: the config's output_router_logits, which SFT / DPO / KTO set; GRPO / RLOO pass True, as
        TRL asks for it in the policy's forward only).

    On fasttune's decoder only the scored positions go through the lm_head, in chunks, so the (tokens x vocab)
    logits of the batch never exist at once; under FSDP (the root's shards, embeddings and lm_head, are gathered
    only inside model(...)) and on the transformers fallback the logits come from model(...), as transformers
    computes them.
    """
    from fasttune.models.causal_lm import CausalLM
    from fasttune.train.fsdp import is_sharded

    entropy = entropy or extras
    start = input_ids.shape[1] - (input_ids.shape[1] - 1 if last is None else last)
    targets, mask = input_ids[:, start:], score[:, start:].bool()
    if isinstance(model, CausalLM) and not is_sharded(model):
        hidden = scored_hidden(model, input_ids, attention_mask, mask, positions, position_ids, media, aux_out,
                               output_router_logits)
        flat_extras = hidden.new_zeros(hidden.shape[0], len(EXTRAS), dtype=torch.float32) if extras else None
        flat = model.token_logprobs(hidden, select_scored(targets, mask, positions), temperature, entropy=entropy,
                                    extras=flat_extras)
        scattered = [torch.zeros(mask.shape, dtype=torch.float32, device=t.device).masked_scatter(mask, t)
                     for t in (flat if entropy else (flat,))]
        if extras:
            scattered.append(flat_extras.new_zeros(*mask.shape, len(EXTRAS)).masked_scatter(mask[..., None],
                                                                                            flat_extras))
        return tuple(scattered) if entropy else scattered[0]
    keep = 0 if last is None else last + 1  # 0: every position's logits
    router = {"output_router_logits": True} if aux_out is not None and output_router_logits else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_logits=True,
                logits_to_keep=keep, **router, **(media or {}))
    if aux_out is not None and getattr(out, "aux_loss", None) is not None:
        aux_out.append(out.aux_loss)
    logits = out.logits[:, :-1]
    z = logits.float() / temperature
    logp_all = z.log_softmax(-1)
    logps = logp_all.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    if not entropy:
        return logps
    out = (logps, (-(logp_all.exp() * logp_all).sum(-1)).masked_fill(~mask, 0.0))
    if extras:
        flat = logit_extras(z.detach().flatten(0, 1), targets.flatten())
        out += (flat.view(*mask.shape, len(EXTRAS)).masked_fill(~mask[..., None], 0.0),)
    return out


def scored_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                  positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  media: dict | None = None, aux_out: list | None = None,
                  output_router_logits: bool | None = None) -> torch.Tensor:
    """(N, H) final hidden states of fasttune's `model` (a CausalLM) at the positions that predict the scored tokens:
    `mask` (B, n) bool marks the scored tokens among the last n of input_ids (B, T), N = mask.sum(); `positions`:
    score_positions(mask), to select them without a device sync; position_ids / media / aux_out /
    output_router_logits as in model_token_logprobs. On PaliGemma (family.prefix_lm) the scored tokens (the
    completions) are the suffix, attending causally, and the rest of each row the prefix, attending both ways (its
    token_type_ids). Under FSDP the pass goes through the model's forward (backbone=True), which gathers the root's
    shards; they stay gathered after it (FSDP's rule for the root), so the caller may read the LM head's weight.
    Differentiable when the model trains."""
    from fasttune.models.moe import load_balancing_loss

    start = input_ids.shape[1] - mask.shape[1]
    if output_router_logits is None:
        output_router_logits = bool(getattr(model.config, "output_router_logits", False))
    router = aux_out is not None and model.arch.num_experts > 0 and output_router_logits
    prefix_lm = getattr(getattr(model, "family", None), "prefix_lm", False)
    types = None
    if prefix_lm:  # PaliGemma: the completions are the suffix
        types = torch.zeros_like(input_ids)
        types[:, start:] = mask.long()
    if is_sharded(model):  # FSDP: through the root's forward, which gathers the embeddings and the LM head
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_router_logits=router, backbone=True, **({"token_type_ids": types} if prefix_lm else {}),
                    **(media or {}))
    elif media or prefix_lm:  # images merged into the embeddings, multimodal positions: the model's own backbone pass
        from fasttune.models.vision import VisionBackbone

        out = VisionBackbone(model)(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    output_router_logits=router, token_type_ids=types, **(media or {}))
    else:
        out = model.model(input_ids, attention_mask, position_ids, output_router_logits=router)
    if router and out.router_logits:
        aux_out.append(load_balancing_loss(list(out.router_logits), model.arch.num_experts,
                                           model.arch.num_experts_per_tok, attention_mask))
    return select_scored(out.last_hidden_state[:, start - 1:-1], mask, positions)


@contextmanager
def adapters_disabled(model):
    """The reference policy: the model with its LoRA adapters switched off."""
    from fasttune.models.causal_lm import CausalLM

    if isinstance(model, CausalLM):
        from fasttune.peft.lora import set_adapters_enabled

        set_adapters_enabled(model, False)
        try:
            yield
        finally:
            set_adapters_enabled(model, True)
    else:  # the transformers fallback: PEFT's own switch
        with model.hf_model.disable_adapter():
            yield


def _rank0_says(model, identity: bool) -> bool:
    """`identity` as rank 0 found it, for a model loaded with from_pretrained(fsdp=True) under torchrun (still
    unsharded: `model.fsdp_device` set on every rank), whose ranks after the first hold their weights on the meta
    device until FSDP shards the model and cannot read them; else `identity`. Every rank calls it then."""
    import torch.distributed as dist

    if getattr(model, "fsdp_device", None) is None or not (dist.is_available() and dist.is_initialized()):
        return identity
    said = [identity]
    dist.broadcast_object_list(said, src=0)
    return bool(said[0])


def _reshard(model):
    """Under FSDP2, free every sharded module's gathered parameters, so that the next forward gathers the values just
    swapped into the shards: FSDP keeps the root's parameters (embeddings, LM head, a vision tower) gathered after a
    forward, and the policy's forward after a reference pass would otherwise run with the reference's LM head (or
    the reverse). A no-op without FSDP (whose root is then not sharded either)."""
    if not is_sharded(model):
        return
    for m in model.modules():
        if is_sharded(m):
            m.reshard()


def _distributed(full: torch.Tensor, param: DTensor) -> DTensor:
    """A copy `full` taken before FSDP sharded `param`, as a DTensor laid out like it. distribute_tensor takes the
    values from rank 0, so a copy of a rank's meta tensor (from_pretrained(fsdp=True)) only needs its shape there."""
    local = torch.empty(full.shape, dtype=full.dtype, device=param.device) if full.is_meta else full.to(param.device)
    return distribute_tensor(local, param.device_mesh, param.placements)


class ReferencePolicy:
    """The reference of DPO, KTO and GRPO: the policy as handed to the trainer, as TRL takes it (TRL copies a given
    PEFT adapter as a frozen "ref" adapter; an adapter it creates from a peft_config is the base, adapters off).

    A fresh adapter (every LoRA B zero, nothing else trained) is the base itself: the reference passes switch the
    adapters off, with no copy. An adapter that is not the identity (loaded from a folder, trained, or with
    modules_to_save) is kept as a frozen copy of the trainable weights and swapped in for the reference passes; so is
    every weight of a fully fine-tuned model (a second copy of the model, as TRL keeps its reference model). The
    swap exchanges the values of each parameter and its copy in place, one parameter at a time (no third copy of the
    model), so a reference pass must come before the policy's forward of the same batch, never between that forward
    and its backward.

    keep_copy: keep the copy even for a fresh adapter (TR-DPO's syncs move it, reference_sync.py).
    """

    def __init__(self, model, keep_copy: bool = False):
        self.model = model
        self.saved = None
        self.whole = None  # the copy gathered whole for a block (gathered), else None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        identity = model.lora_settings is not None and all(
            "lora_" in n and ("lora_B" not in n or p.is_meta or not p.detach().any()) for n, p in trainable)
        identity = _rank0_says(model, identity)
        if keep_copy or not identity:
            self.saved = {n: p.detach().clone() for n, p in trainable}

    @classmethod
    def from_weights(cls, model, weights: dict) -> "ReferencePolicy":
        """A policy of `model` with `weights` ({trainable parameter name: tensor of its shape}) swapped in: SDFT's
        EMA teacher (weights it moves with blend)."""
        policy = cls.__new__(cls)
        policy.model, policy.saved, policy.whole = model, weights, None
        return policy

    @torch.no_grad()
    def blend(self, rate: float):
        """Move the kept weights towards the model's: w <- (1 - rate) w + rate x the parameter (an exponential moving
        average, TRL's PEFTAdapterEMACallback update). Only for a policy that keeps weights (is_copy)."""
        params = dict(self.model.named_parameters())
        for n, w in self.saved.items():
            p = params[n]
            if isinstance(p, DTensor) and not isinstance(w, DTensor):  # FSDP sharded the model after the copy
                w = self.saved[n] = _distributed(w, p)
            w.mul_(1.0 - rate).add_(p.detach().to(w.dtype), alpha=rate)

    @property
    def is_copy(self) -> bool:
        """True when the reference is a frozen copy of the starting weights (not the base with adapters off)."""
        return self.saved is not None

    @contextmanager
    def gathered(self):
        """Under FSDP, the kept copy whole on every rank for the block, for `active` inside a block where the model is
        gathered whole too (train/fsdp.py's unsharded: GRPO's rollouts, where each rank runs its own number of
        passes): there the swap exchanges whole tensors in place, with no collective and no reshard. Enter it before
        the model's unsharded block (the copy is laid out like the sharded parameters first). A collective on entry
        (every rank); nested, the outermost does the work; nothing for a reference without a copy."""
        if self.saved is None or self.whole is not None:
            yield
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            whole = {}
            for n, ref in self.saved.items():
                p = params[n]
                if isinstance(p, DTensor):
                    if not isinstance(ref, DTensor):  # FSDP sharded it after the copy
                        ref = self.saved[n] = _distributed(ref, p)
                    whole[n] = ref.full_tensor()
                else:
                    whole[n] = ref
        self.whole = whole
        try:
            yield
        finally:
            self.whole = None

    @contextmanager
    def active(self):
        """Within this context the model computes the reference policy."""
        if self.saved is None:
            with adapters_disabled(self.model):
                yield
            return
        params = dict(self.model.named_parameters())
        # Inside a gathered rollout (the model unsharded, the copy gathered whole: see gathered) the swap is of whole
        # tensors, with no collective; otherwise of the shards, around a reshard of what FSDP keeps gathered.
        whole = self.whole is not None and self.model.__dict__.get("_unsharded_depth", 0)
        kept = self.whole if whole else self.saved
        with torch.no_grad():
            if not whole:
                for n, ref in self.saved.items():
                    p = params[n]
                    if isinstance(p, DTensor) and not isinstance(ref, DTensor):  # FSDP sharded it after the copy
                        self.saved[n] = _distributed(ref, p)
                _reshard(self.model)
            self._swap(params, kept)  # the reference's weights in the model, the policy's in the copy
        try:
            yield
        finally:
            with torch.no_grad():
                if not whole:
                    _reshard(self.model)
                self._swap(params, kept)

    def _swap(self, params: dict, saved: dict):
        """Exchange each parameter's values with its kept copy's in `saved` ({name: tensor}), one at a time."""
        for n, kept in saved.items():
            p = params[n]
            held = p.detach().clone()
            p.copy_(kept)
            kept.copy_(held)

