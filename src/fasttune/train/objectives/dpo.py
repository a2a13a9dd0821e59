"""DPO (Rafailov et al. 2023) as TRL 1.16 computes it: summed completion log-probs of policy and reference (the policy
as handed to the trainer, see ReferencePolicy, or log-probs precomputed into the data), a loss per pair, the mean
over the pairs of the whole accumulated batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.preference_base import PreferenceTrainer, pair_sums
from fasttune.train.objectives.reference import reference_policy

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(TrainingConfig):
    """TrainingConfig plus DPO's fields, named as in TRL's DPOConfig. Raises ConfigError for beta <= 0, an unknown
    loss_type or max_prompt_length < 1."""

    beta: float = 0.1
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's DPO default)
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    max_prompt_length: int | None = None  # keep the last tokens of longer prompts
    precompute_ref_log_probs: bool = False  # reference log-probs once before training (then no reference passes)

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type='{self.loss_type}' is not supported by DPO; use one of {LOSS_TYPES}.")
        check_prompt_length(self.max_prompt_length)


def check_beta(beta):
    """Raise ConfigError unless beta > 0."""
    if not beta > 0:
        raise ConfigError(f"beta={beta!r} is invalid: it must be a number > 0 (0.1 is common).")


def check_prompt_length(n):
    """Raise ConfigError unless n is None or >= 1."""
    if n is not None and n < 1:
        raise ConfigError(f"max_prompt_length={n!r} is invalid: a whole number >= 1, or None for no limit.")


class DPOTrainer(PreferenceTrainer):
    """DPO on paired rows (prompt, chosen, rejected). The reference log-probs come from the data
    (ref_chosen_logps / ref_rejected_logps), from the model before training (precompute_ref_log_probs=True), or
    else from a ReferencePolicy each step; that needs LoRA, so full fine-tuning without the first two raises
    ConfigError."""

    config_cls = DPOConfig
    method = "DPO"
    supports_vision = True

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: DPOConfig | None = None,
                 **kwargs):
        super().__init__(model, tokenizer, train_dataset, eval_dataset, args, **kwargs)
        sets = [self.train_examples] + ([self.eval_examples] if self.eval_examples else [])
        missing = [s for s in sets if "ref_chosen_logps" not in s[0]]
        if missing and self.args.precompute_ref_log_probs:
            # Once, before training: the model as it is now is the reference.
            for examples in missing:
                self._precompute(examples)
        elif missing:
            self.reference = reference_policy(
                model, "DPO", "Give the data 'ref_chosen_logps' / 'ref_rejected_logps' columns, or set "
                              "precompute_ref_log_probs=True to take them from the model before training.")

    def _precompute(self, examples: list[dict]):
        for part, ref in self.logps_before_training(examples):
            chosen, rejected = ref.chunk(2)  # the chosen rows first
            for ex, c, r in zip(part, chosen.tolist(), rejected.tolist()):
                ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r

    def micro_batch_loss(self, batch: dict, num_items: int):
        """Sigmoid, hinge or IPO loss of beta x the difference of chosen and rejected log-ratios (TRL's DPO
        losses), summed over the pairs and divided by num_items; metrics rewards/* and logps/*."""
        a = self.args
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:  # before the policy's forward (ReferencePolicy swaps weights in place)
            ref_chosen, ref_rejected = self.reference_logps(batch).sum(-1).chunk(2)
        logps = self.logps(batch).sum(-1)
        chosen, rejected = logps.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        if a.loss_type == "sigmoid":
            losses = -F.logsigmoid(a.beta * delta)
        elif a.loss_type == "hinge":
            losses = torch.relu(1 - a.beta * delta)
        else:  # ipo: per-token averaged log-ratios, as TRL normalises them (confirmed with the IPO authors)
            lengths = batch["completion_mask"].sum(-1).clamp(min=1).chunk(2)
            avg = chosen_ratio / lengths[0] - rejected_ratio / lengths[1]
            losses = (avg - 1 / (2 * a.beta)) ** 2
        sums = pair_sums(a.beta * chosen_ratio, a.beta * rejected_ratio, chosen, rejected)
        return self.report(losses.sum() / num_items, sums, num_items)
