"""use_gradient_checkpointing="auto": pick the fastest recompute policy that fits the free GPU memory.

LoRA without recompute does ~4N FLOPs per token instead of ~6N, so "off" is taken whenever the activations it
keeps fit; when they do not, only as many layers as needed are recomputed (each recomputed layer costs its forward
again, each kept one its saved values; the last layer is never recomputed, see choose_checkpointing), and only when
that does not fit either are the layer inputs sent to the host ("offload"). Lean saves (the kept layers rebuild
their norm and activation outputs in backward, kernels/rebuild.py) are added where they spare recomputed layers.
The estimate counts what one decoder layer saves for backward per token (with our kernels: the norm input and
output, q/k/v, the attention output, gate, up and act(gate); less train/lean_count.py's count with lean saves),
times layers and micro-batch tokens, and a training vision tower's patches likewise, with a safety factor; plus the
loss chunk and the trainable parameters' optimizer state. CPU runs keep "off" (memory is rarely the limit).
"""
from __future__ import annotations

import torch

from fasttune.kernels.cross_entropy import CHUNK_BYTES
from fasttune.train.lean_count import lean_values

SAFETY = 1.3  # allocator fragmentation and temporaries the count leaves out
RESERVE_BYTES = 2 << 30  # left free for the CUDA context, cuBLAS workspaces and the optimizer step
# What lean saves cost, in recomputed layers: a kept layer's rebuild passes move ~(4h + 3I) x 2 bytes a token against
# its forward's ~2 x (its weights) FLOPs a token, ~5% of a layer's forward time on the 8B shape at an H200's rates
# (~3.5 TB/s, ~650 TFLOP/s), so at most ~1.6 layers' recompute for 32 layers; an estimate, not measured.
LEAN_COST_LAYERS = 2
# What sending the recomputed layers' inputs to the host ("offload" with part of the layers recomputed) costs, in
# recomputed layers: its copies run on a side stream under the layers' arithmetic (measured on one H200, 8B bf16 at
# 2 x 2048 tokens with every layer recomputed: 12,619 tokens/s with "offload" against 12,559 with True), so it is
# taken only where it spares at least two recomputed layers; an estimate kept above the measured ~0.
OFFLOAD_COST_LAYERS = 1
# Layer inputs "offload" still holds on the GPU: the one being copied out and the one brought back ahead of its
# backward (models/offload.py prefetches one layer).
OFFLOAD_INPUTS_ON_GPU = 2


def _layer_values(cfg) -> list[int]:
    """Values saved per token by each decoder layer: attention (6h + 2 kv; a Mamba-2 mixer's own count in Granite
    4.0's Mamba layers) plus the MLP's gate, up and act (3I),
    or for a sparse MoE layer k times its expert rows (input h, gate_up 2I, act I, output h) and the fp32 router
    logits (2E values)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    dense = 6 * h + 2 * kv + 3 * cfg.intermediate_size
    sparse = 6 * h + 2 * kv + cfg.num_experts_per_tok * (2 * h + 3 * cfg.moe_intermediate_size) + 2 * cfg.num_experts
    moe = list(cfg.moe_layers) if cfg.num_experts else []
    values = [sparse if i < len(moe) and moe[i] else dense for i in range(cfg.num_layers)]
    if getattr(cfg, "linear_kind", None) == "mamba2":  # Granite 4.0's Mamba-2 layers instead of attention
        mixer = _mamba_values(cfg)
        values = [v - 6 * h - 2 * kv + mixer if cfg.linear_layers[i] else v for i, v in enumerate(values)]
    return values


def _mamba_values(cfg) -> int:
    """16-bit values a Mamba-2 mixer (models/mamba2.py) saves per token, an fp32 value counting 2, as counted on its
    saved tensors with the torch kernels (tests/train/test_memory_policy.py; the Triton gated norm keeps fewer):
    in_proj's output, the conv's and out_proj's inputs (16-bit: 2 inner + 2 conv + heads); about ten (tokens x
    inner) fp32 tensors (the steps times the input, the decayed values, the outputs, the gated norm's: 20 inner);
    the states entering each chunk (heads x d_state x head_dim fp32 a chunk); the (chunk x chunk) decay and score
    blocks per head (4 heads x chunk); B and C per group in fp32 and their copies (12 groups x d_state); about 5h for
    the input and the small ones (steps, decays, norm statistics)."""
    from fasttune.models.ssd import CHUNK

    inner = cfg.mamba_heads * cfg.mamba_head_dim
    conv = inner + 2 * cfg.mamba_groups * cfg.mamba_state
    return (5 * cfg.hidden_size + 20 * inner + 2 * conv + cfg.mamba_heads
            + 2 * cfg.mamba_heads * cfg.mamba_state * cfg.mamba_head_dim // CHUNK + 4 * cfg.mamba_heads * CHUNK
            + 12 * cfg.mamba_groups * cfg.mamba_state)


def activation_bytes(cfg, tokens: int, bytes_per_el: int, recompute: bool) -> int:
    """Estimated bytes of activations saved for backward for `tokens` tokens at `bytes_per_el` bytes a value,
    from the model's Config (hidden, kv heads x head_dim, intermediate, layers; for MoE layers the top-k expert
    rows). recompute=True counts the layer inputs of all layers plus the largest layer's full set; no safety
    factor, no logits (see choose_checkpointing)."""
    return checkpointing_bytes(cfg, tokens, bytes_per_el, cfg.num_layers if recompute else 0)


def checkpointing_bytes(cfg, tokens: int, bytes_per_el: int, recomputed: int, lean: list[int] | None = None) -> int:
    """Estimated peak bytes of activations when the first `recomputed` of cfg's layers are recomputed in backward
    and the later ones keep everything they save: the recomputed layers' inputs, plus the larger of the kept layers'
    full sets (alive together when backward starts) and one recomputed layer's full set (made during its backward,
    after the kept layers' backward has freed theirs). recomputed=0 is activation_bytes(..., recompute=False),
    recomputed=layers is activation_bytes(..., recompute=True). lean: lean_values' per-layer savings, which the kept
    layers make with lean saves on (recomputed layers do not use them). No safety factor, no loss."""
    values = _layer_values(cfg)
    during = max(values[:recomputed]) if recomputed else 0
    kept = sum(values[recomputed:]) - (sum(lean[recomputed:]) if lean else 0)
    return tokens * bytes_per_el * (recomputed * cfg.hidden_size + max(kept, during))


def tower_bytes(model, media_tokens: int, bytes_per_el: int, recompute: bool) -> int:
    """Estimated bytes a training vision tower (LoRA on it: finetune_vision_layers) keeps for backward for
    `media_tokens` image / video placeholder tokens: their patches (models/vision_families.py: patches_per_token)
    times the tower's layers times a layer's values per patch (6 hidden + 3 intermediate, as a decoder layer's
    count); with recompute (the tower recomputes with the decoder, models/vision.py) its layer inputs and one layer's
    full set. 0 for a text model or a frozen tower (nothing of it is kept)."""
    family = getattr(model, "family", None)
    if family is None or not media_tokens:
        return 0
    from fasttune.models.vision_families import patches_per_token

    towers = [getattr(model, attr, None) for attr, _ in family.vision_modules]
    if not any(p.requires_grad for t in towers if isinstance(t, torch.nn.Module) for p in t.parameters()):
        return 0
    vision = model.hf_config.vision_config
    hidden = getattr(vision, "hidden_size", None) or 1024
    inter = getattr(vision, "intermediate_size", None) or 4 * hidden
    layers = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None) or 24
    patches = media_tokens * patches_per_token(family, model.hf_config)
    per_layer = patches * (6 * hidden + 3 * inter)
    kept = layers * patches * hidden + per_layer if recompute else layers * per_layer
    return int(kept * bytes_per_el)


def loss_bytes(vocab: int, tokens: int) -> int:
    """Peak bytes of the fused cross-entropy beside the activations: one chunk's fp32 logits, their softmax and the
    16-bit gradient (kernels/cross_entropy.py: CHUNK_BYTES of logits a chunk), at most the whole batch's."""
    return 3 * min(CHUNK_BYTES, 4 * tokens * vocab)


def free_bytes(device: torch.device) -> int:
    """GPU bytes this process may still allocate on `device`: the card's free memory, and no more than a cap set by
    torch.cuda.set_per_process_memory_fraction (a GPU shared with other jobs) leaves above what is allocated."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)(device)
    if fraction < 1.0:
        free = min(free, int(fraction * total) - torch.cuda.memory_allocated(device))
    return max(0, free)


def peak_estimate(model, micro_batch_tokens: int, media_tokens: int = 0, lean_ok: bool = True):
    """(need, lean): need(recomputed, lean_on, offloaded=False) -> the estimated peak bytes of training `model` on
    micro-batches of `micro_batch_tokens` tokens with its first `recomputed` layers recomputed, with or without lean
    saves, their inputs on the GPU or (offloaded) in host memory but for OFFLOAD_INPUTS_ON_GPU of them: SAFETY times
    checkpointing_bytes (plus a training tower's tower_bytes), plus loss_bytes and the trainable parameters' gradients
    and AdamW states; lean: lean_values per layer ([0] with lean_ok False)."""
    cfg, el = model.arch, torch.finfo(model.dtype).bits // 8
    # the trainable parameters' gradients and two AdamW states, in their dtype (LoRA: fp32), made at the first step
    states = sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None) \
        if hasattr(model, "parameters") else 0
    fixed = loss_bytes(cfg.vocab_size, micro_batch_tokens) + states
    tower = [tower_bytes(model, media_tokens, el, recompute) for recompute in (False, True)]
    lean = lean_values(model) if lean_ok else [0]

    def need(recomputed: int, lean_on: bool, offloaded: bool = False) -> float:
        """Estimated peak bytes (see peak_estimate)."""
        kept = checkpointing_bytes(cfg, micro_batch_tokens, el, recomputed, lean if lean_on else None)
        if offloaded:
            kept -= max(0, recomputed - OFFLOAD_INPUTS_ON_GPU) * micro_batch_tokens * cfg.hidden_size * el
        return SAFETY * (kept + tower[recomputed > 0]) + fixed
    return need, lean


def choose_checkpointing(model, micro_batch_tokens: int, media_tokens: int = 0, lean_ok: bool = True,
                         offload_ok: bool = True) \
        -> tuple[bool | str, str, int | None, bool]:
    """The fastest recompute policy whose estimated peak fits the free GPU memory for micro-batches of
    `micro_batch_tokens` tokens: no recompute; else recompute the fewest first layers that makes it fit (the later
    layers keep their activations; at least the last one does), with lean saves (the layers rebuild their norm and
    activation outputs in backward, lean_values) when they spare more recomputed layers than LEAN_COST_LAYERS, and
    with the recomputed layers' inputs in host memory ("offload" for those layers) when that spares more than
    OFFLOAD_COST_LAYERS (each choice's cost counted in recomputed layers, the cheapest taken); else "offload" for
    every layer. The estimate: SAFETY times checkpointing_bytes (plus a training vision tower's tower_bytes for
    the micro-batch's `media_tokens` image / video placeholder tokens), plus loss_bytes and the trainable
    parameters' gradients and AdamW states (made at the first step, in the parameters' dtype), against the free
    memory (free_bytes) less RESERVE_BYTES. lean_ok=False never picks lean saves; offload_ok=False (CUDA graphs:
    host copies cannot be captured) never sends only part of the inputs to the host.

    Returns (mode for model.gradient_checkpointing: False | True | "offload", a one-line explanation,
    recompute_layers: how many layers from the first to recompute, None for all, lean_saves: bool)."""
    if model.device.type != "cuda":
        return False, "gradient checkpointing auto -> off (CPU)", None, False
    free = free_bytes(model.device)
    budget = free - RESERVE_BYTES
    gib, layers = 2**30, model.arch.num_layers
    need, lean = peak_estimate(model, micro_batch_tokens, media_tokens, lean_ok)

    # Fewest recomputed layers first: each one recomputed costs time. The last layer is never recomputed: its
    # backward runs first, right after the forward pass, so recomputing it would only add its input to the peak.
    def fewest(lean_on: bool, offloaded: bool) -> int | None:
        """The fewest recomputed layers (0 .. layers - 1; at least 1 with offloaded inputs) whose need fits the
        budget, or None."""
        return next((n for n in range(1 if offloaded else 0, layers) if need(n, lean_on, offloaded) <= budget), None)

    # Each choice's cost in recomputed layers: lean saves a pass over the rebuilt values in every layer, the
    # offloaded inputs their copies; the cheapest fitting choice is taken (the plainer one on a tie).
    choices = [(n + LEAN_COST_LAYERS * lean_on + OFFLOAD_COST_LAYERS * offloaded, lean_on, offloaded, n)
               for offloaded in ((False, True) if offload_ok else (False,))
               for lean_on in ((False, True) if any(lean) else (False,))
               for n in [fewest(lean_on, offloaded)] if n is not None]
    if choices:
        _, lean_on, offloaded, recomputed = min(choices, key=lambda c: (c[0], c[2], c[1]))
        fits = f"needs ~{need(recomputed, lean_on, offloaded) / gib:.1f} GiB of {free / gib:.1f} GiB free for " \
               f"{micro_batch_tokens} tokens per micro-batch" + \
               (" with lean saves (norm and activation outputs rebuilt in backward)" if lean_on else "")
        if recomputed == 0:
            return False, f"gradient checkpointing auto -> off: {fits}", None, lean_on
        if offloaded:
            return "offload", (f"gradient checkpointing auto -> offload for the first {recomputed} of {layers} "
                               f"layers (recomputed, their inputs in CPU memory; the last {layers - recomputed} keep "
                               f"their activations): {fits}"), recomputed, lean_on
        return True, (f"gradient checkpointing auto -> on for the first {recomputed} of {layers} layers (the last "
                      f"{layers - recomputed} keep their activations): {fits}"), recomputed, lean_on
    # (offload recomputes every layer, which lean saves leave alone)
    return "offload", (f"gradient checkpointing auto -> offload (layer inputs to CPU): {micro_batch_tokens} tokens "
                       f"per micro-batch do not fit {free / gib:.1f} GiB free otherwise"), None, False


def apply_pick(model, mode: bool | str, recomputed: int | None, lean: bool):
    """Set a choose_checkpointing pick on the model: its recompute mode, how many layers are recomputed (None keeps
    the mode's default, every layer) and lean saves (where the model has them: our decoder's)."""
    model.gradient_checkpointing = mode
    if recomputed is not None:  # (only our decoder recomputes part of its layers)
        model.recompute_layers = recomputed
    if hasattr(model, "lean_saves"):
        model.lean_saves = lean


def agreed_pick(picks: list[tuple], layers: int, need) -> tuple[bool | str, int | None, bool]:
    """The one (mode, recompute_layers, lean_saves) every rank of a distributed run takes from their own
    choose_checkpointing picks: the one whose estimated peak (`need`, peak_estimate's, the same on every rank) is the
    least. It fits every rank: the poorest rank's own pick fits its memory and needs no less. Ranks must agree: under
    FSDP a layer's recompute gathers its shards, a collective every rank has to join."""
    def peak(pick) -> float:
        """The pick's estimated peak bytes; full "offload" below everything (its one layer's set is what remains)."""
        mode, recomputed, lean = pick
        if mode == "offload" and recomputed is None:
            return -1.0
        return need(0 if mode is False else layers if recomputed is None else recomputed, lean, mode == "offload")
    return min(picks, key=peak)


def recompute_hint(model, micro_batch_tokens: int, media_tokens: int = 0) -> str | None:
    """For a model set to recompute every layer (use_gradient_checkpointing=True, "offload" or the peer's
    "unsloth") on a GPU where choose_checkpointing's estimate fits recomputing fewer layers: a one-line hint that
    "auto" would (each layer not recomputed saves its forward pass again); else None."""
    mode = model.gradient_checkpointing
    if model.device.type != "cuda" or mode not in (True, "offload") or \
            getattr(model, "recompute_layers", "absent") is not None:  # (a count set, or not our decoder)
        return None
    pick, _, recomputed, lean = choose_checkpointing(model, micro_batch_tokens, media_tokens)
    if pick is not False and recomputed is None:
        return None
    layers = model.arch.num_layers
    fewer = "none of the layers" if pick is False else f"only the first {recomputed} of {layers} layers"
    fewer += " with lean saves" if lean else ""
    fewer += " and their inputs in CPU memory ('offload' for those layers)" if pick == "offload" else ""
    return (f"hint: use_gradient_checkpointing={mode!r} recomputes all {layers} layers, but by the estimate this "
            f"GPU's free memory fits recomputing {fewer} at {micro_batch_tokens} tokens per micro-batch; "
            f"use_gradient_checkpointing='auto' picks that, and each layer not recomputed saves its forward pass.")


def most_media_tokens(examples: list[dict], processor, scanned: int = 1000) -> int:
    """The most image / video placeholder tokens (the processor's image_token_ids) in one of the `scanned` longest
    examples (a preference pair's two rows count twice); what a training tower keeps scales with them, and the
    longest rows are where the media are. 0 without such ids (a text tokenizer)."""
    marks = getattr(processor, "image_token_ids", None)
    if not marks:
        return 0
    import heapq

    def ids(ex):
        """The example's row or prompt ids."""
        return ex.get("input_ids") or ex.get("prompt_ids") or ()
    longest = heapq.nlargest(scanned, examples, key=lambda ex: len(ids(ex)))
    return max((sum(map(marks.__contains__, ids(ex))) * (2 if "chosen_ids" in ex else 1) for ex in longest),
               default=0)
