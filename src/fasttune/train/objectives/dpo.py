"""DPO (Rafailov et al. 2023) as TRL 1.16 computes it: summed completion log-probs of policy and reference (the policy
as handed to the trainer, see ReferencePolicy, or log-probs precomputed into the data), a loss per pair, the mean
over the pairs of the whole accumulated batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.dpo_loss import check_losses, f_scores, pair_losses
from fasttune.train.objectives.preference_base import PreferenceTrainer, pair_sums, token_sums
from fasttune.train.objectives.reference_sync import ReferenceSync, check_sync_settings, synced_reference


@dataclass
class DPOConfig(TrainingConfig):
    """TrainingConfig plus DPO's fields, named as in TRL's DPOConfig (the losses: train/objectives/dpo_loss.py);
    use_weighting: WPO (Zhou et al. 2024), each pair's loss times the two completions' weights exp(mean over their
    tokens of log p_t - log sum_v p_v^2), no gradient through them; ld_alpha: LD-DPO (Liu et al. 2024), each
    completion's log-prob is its tokens' within the shorter completion's length plus ld_alpha x the rest's, for
    policy and reference alike. Raises ConfigError for beta <= 0, an unknown loss_type or f_divergence_type,
    loss_weights that do not match, label_smoothing outside [0, 0.5), max_prompt_length < 1, ld_alpha < 0,
    use_weighting with aot / aot_unpaired (they sort the pairs, as TRL refuses), and the sync settings that
    reference_sync.check_sync_settings refuses (sync_ref_model with precompute_ref_log_probs too)."""

    weighted_losses = True  # (not a field) TRL's list of loss types is taken as it is, see config_names
    beta: float = 0.1
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's DPO default)
    loss_type: str | list = "sigmoid"  # one of dpo_loss.LOSS_TYPES, or a list of them summed with loss_weights
    loss_weights: list | None = None  # one weight per loss type (default 1 each)
    label_smoothing: float = 0.0  # robust / exo_pair / aot: the assumed share of flipped preference labels
    discopop_tau: float = 0.05  # discopop: the temperature of its mixing sigmoid
    f_divergence_type: str = "reverse_kl"  # forward_kl | js_divergence | alpha_divergence: the scores' f'
    f_alpha_divergence_coef: float = 1.0  # alpha_divergence's alpha
    max_prompt_length: int | None = None  # keep the last tokens of longer prompts
    precompute_ref_log_probs: bool = False  # reference log-probs once before training (then no reference passes)
    use_weighting: bool = False  # WPO's per-pair weights
    ld_alpha: float | None = None  # LD-DPO: the weight of the longer completion's tokens past the shorter's length
    # TRL's MoE load-balancing loss weight; None: the model config's (so it is on for MoE models, as in TRL 1.16)
    router_aux_loss_coef: float | None = None
    # TR-DPO (reference_sync.py): every ref_model_sync_steps optimizer steps, ref <- alpha x policy + (1 - alpha) x ref
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self):
        if isinstance(self.loss_type, str) and "," in self.loss_type:  # a CLI flag: "sigmoid,sft"
            self.loss_type = [t.strip() for t in self.loss_type.split(",") if t.strip()]
        if isinstance(self.loss_weights, str):
            try:
                self.loss_weights = [float(w) for w in self.loss_weights.split(",") if w.strip()]
            except ValueError:
                raise ConfigError(f"loss_weights={self.loss_weights!r} is invalid: give numbers, e.g. 0.8,0.2.") \
                    from None
        super().__post_init__()
        check_beta(self.beta)
        check_losses(self.loss_type, self.loss_weights, self.label_smoothing, self.f_divergence_type)
        check_prompt_length(self.max_prompt_length)
        check_sync_settings(self, "precompute_ref_log_probs=True fixes the reference log-probs before training (as "
                                  "TRL refuses)" if self.precompute_ref_log_probs else None)
        if self.ld_alpha is not None and not self.ld_alpha >= 0:
            raise ConfigError(f"ld_alpha={self.ld_alpha!r} is invalid: the weight of the tokens past the shorter "
                              f"completion's length, >= 0 (LD-DPO uses values in [0, 1]), or None for plain sums.")
        types = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        if self.use_weighting and {"aot", "aot_unpaired"} & set(types):
            raise ConfigError("use_weighting=True (WPO) does not combine with loss_type 'aot' / 'aot_unpaired': they "
                              "sort the pairs' log-ratios, which would misalign the per-pair weights (as in TRL).")


def check_beta(beta):
    """Raise ConfigError unless beta > 0."""
    if not beta > 0:
        raise ConfigError(f"beta={beta!r} is invalid: it must be a number > 0 (0.1 is common).")


def check_prompt_length(n):
    """Raise ConfigError unless n is None or >= 1."""
    if n is not None and n < 1:
        raise ConfigError(f"max_prompt_length={n!r} is invalid: a whole number >= 1, or None for no limit.")


class DPOTrainer(ReferenceSync, PreferenceTrainer):
    """DPO on paired rows (prompt, chosen, rejected). The reference log-probs come from the data
    (ref_chosen_logps / ref_rejected_logps), from the model before training (precompute_ref_log_probs=True), or
    else from a ReferencePolicy each step (with full fine-tuning a second copy of the weights, as TRL keeps a
    reference model). Raises ConfigError for sync_ref_model (TR-DPO, reference_sync.py) with reference log-probs in
    the data."""

    config_cls = DPOConfig
    method = "DPO"
    supports_vision = True

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: DPOConfig | None = None,
                 **kwargs):
        super().__init__(model, tokenizer, train_dataset, eval_dataset, args, **kwargs)
        a = self.args
        # (loss types, weights), checked once
        self.losses = check_losses(a.loss_type, a.loss_weights, a.label_smoothing, a.f_divergence_type)
        sets = [self.train_examples] + ([self.eval_examples] if self.eval_examples else [])
        missing = [s for s in sets if "ref_chosen_logps" not in s[0]]
        if missing and self.args.precompute_ref_log_probs:
            # Once, before training: the model as it is now is the reference.
            for examples in missing:
                self._precompute(examples)
        elif missing:
            self.reference = synced_reference(model, a)
        self.check_reference_sync("DPO", "the data's ref_chosen_logps / ref_rejected_logps columns fix the "
                                         "reference log-probs")

    def sequence_logps(self, per_token: torch.Tensor, batch: dict) -> torch.Tensor:
        """(2B,) completion log-probs from per-token ones (2B, T-1), chosen rows first: their sums, or with ld_alpha
        LD-DPO's: the tokens within each pair's shorter completion in full, the longer one's rest times ld_alpha
        (TRL's DPOTrainer)."""
        alpha = self.args.ld_alpha
        if alpha is None:
            return per_token.sum(-1)
        mask = batch["completion_mask"][:, 1:].to(per_token.dtype)
        position = mask.cumsum(1)
        shared = torch.minimum(*mask.sum(1).chunk(2)).repeat(2)[:, None]
        return (per_token * (position <= shared)).sum(1) + alpha * (per_token * (position > shared)).sum(1)

    def _precompute(self, examples: list[dict]):
        for part, ref in self.logps_before_training(examples):
            chosen, rejected = ref.chunk(2)  # the chosen rows first
            for ex, c, r in zip(part, chosen.tolist(), rejected.tolist()):
                ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r

    def micro_batch_loss(self, batch: dict, num_items: int):
        """The loss_type's per-pair losses (dpo_loss.py; several: their loss_weights-weighted sum), summed over the
        pairs and divided by num_items (with use_weighting, each pair times its WPO weights); ld_alpha weighs the
        log-probs (sequence_logps). Metrics as TRL logs them: rewards/*, logps/*, entropy, logits/*,
        mean_token_accuracy (token_sums)."""
        a = self.args
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:  # before the policy's forward (ReferencePolicy swaps weights in place)
            ref_chosen, ref_rejected = self.sequence_logps(self.reference_logps(batch), batch).chunk(2)
        aux = []  # the policy forward's MoE load-balancing loss, when on (router_aux_loss_coef)
        per_token, entropy, extras = self.logps(batch, extras=True, aux_out=aux)
        chosen, rejected = self.sequence_logps(per_token, batch).chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        alpha = a.f_alpha_divergence_coef
        scores = (f_scores(chosen_ratio, a.f_divergence_type, alpha), f_scores(rejected_ratio, a.f_divergence_type,
                                                                                 alpha))
        mask = batch["completion_mask"]
        lengths = mask.sum(-1).clamp(min=1).chunk(2)
        types, weights = self.losses
        chosen_nll = (-per_token.chunk(2)[0].sum() / mask.chunk(2)[0].sum().clamp(min=1)) if "sft" in types else None
        losses = sum(w * pair_losses(t, a.beta, chosen_ratio, rejected_ratio, *scores, lengths, (chosen, rejected),
                                     (ref_chosen, ref_rejected), chosen_nll, a.label_smoothing, a.discopop_tau)
                     for t, w in zip(types, weights))
        if a.use_weighting:  # WPO's eq. 2: every loss type's per-pair term times both completions' weights
            aligned = ((per_token - extras[..., 2]) * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1).clamp(min=1)
            chosen_w, rejected_w = aligned.detach().exp().chunk(2)
            losses = losses * chosen_w * rejected_w
        sums = pair_sums(a.beta * chosen_ratio, a.beta * rejected_ratio, chosen, rejected)
        pairs = mask.shape[0] // 2
        sums.update(token_sums(mask[:, 1:], entropy, extras, slice(0, pairs), slice(pairs, None)))
        return self.report(self.with_aux_loss(losses.sum() / num_items, sums, aux), sums, num_items)
