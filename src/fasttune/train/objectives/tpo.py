"""TPO (Saeidi et al. 2024, "Triple Preference Optimization", arXiv:2405.16681) as TRL 1.16's experimental
TPOTrainer computes it. No reference model: the "reference" is a gold completion, scored by an NLL term.

Per triple, with the policy's completion log-probs (summed over the completion's tokens; their mean for "ipo" and
"tpo-l") as chosen c and rejected r, z = c - r:
- "sigmoid": -(1 - e) log sigmoid(beta z) - e log sigmoid(-beta z), e = label_smoothing;
- "tpo-l": the same with z - tpo_l_gamma / beta;
- "hinge": relu(1 - beta z); "ipo": (z - 1 / (2 beta))^2.
The loss is the mean over triples plus tpo_alpha x the NLL of the reference completions (mean over their tokens; the
prompt is not scored); tpo_alpha = 0 drops the reference rows from the batch, as TRL's collator does. With gradient
accumulation both means run over the whole accumulated batch (TRL's micro-batch means weigh its micro-batches
equally; the two agree when the micro-batches hold as many triples and reference tokens). Rewards logged: beta x c
and beta x r.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttune.data.triple_preference import collate_triples, tokenize_triple_rows
from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.cpo import check_loss_and_smoothing
from fasttune.train.objectives.dpo import check_beta, check_prompt_length
from fasttune.train.objectives.preference_base import (PreferenceTrainer, pair_sums, token_sums,
                                                        with_score_positions)

TPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")
MEAN_LOGPS = ("ipo", "tpo-l")  # losses that take each completion's mean token log-prob instead of its sum


@dataclass
class TPOConfig(TrainingConfig):
    """TrainingConfig plus TPO's fields, as in TRL's experimental TPOConfig (its defaults: beta 0.01, tpo_alpha 1).
    Raises ConfigError for beta <= 0, a loss_type outside TPO_LOSS_TYPES, label_smoothing outside [0, 0.5) or with
    the hinge / ipo losses, tpo_alpha < 0 or max_prompt_length < 1."""

    beta: float = 0.01
    label_smoothing: float = 0.0  # sigmoid / tpo-l: the assumed share of flipped preference labels
    loss_type: str = "sigmoid"
    tpo_alpha: float = 1.0  # weight of the reference (gold) completions' NLL
    tpo_l_gamma: float = 0.5  # TPO-L's target reward margin
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0
    max_prompt_length: int | None = None  # keep the last tokens of longer prompts

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        check_prompt_length(self.max_prompt_length)
        check_loss_and_smoothing("TPO", self.loss_type, TPO_LOSS_TYPES, self.label_smoothing, ("sigmoid", "tpo-l"))
        if not self.tpo_alpha >= 0:
            raise ConfigError(f"tpo_alpha={self.tpo_alpha!r} is invalid: the reference NLL term's weight, >= 0.")


def tpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, args: TPOConfig) -> torch.Tensor:
    """(triples,) losses from the completions' log-probs `chosen` and `rejected` (sums, or means for MEAN_LOGPS),
    as TRL's TPOTrainer computes them (module docstring)."""
    beta, e = args.beta, args.label_smoothing
    z = chosen - rejected
    if args.loss_type == "tpo-l":
        z = z - args.tpo_l_gamma / beta
    if args.loss_type in ("sigmoid", "tpo-l"):
        return -F.logsigmoid(beta * z) * (1 - e) - F.logsigmoid(-beta * z) * e
    if args.loss_type == "hinge":
        return torch.relu(1 - beta * z)
    return (z - 1 / (2 * beta)) ** 2  # ipo


class TPOTrainer(PreferenceTrainer):
    """TPO on triple-preference rows (prompt, chosen, rejected, reference); no reference model."""

    config_cls = TPOConfig
    method = "TPO"

    @property
    def _branches(self) -> int:
        return 3 if self.args.tpo_alpha else 2

    def prepare(self, dataset) -> list[dict]:
        """Triple rows -> examples with prompt_ids / chosen_ids / rejected_ids / reference_ids
        (data/triple_preference.py)."""
        return tokenize_triple_rows(dataset, self.tokenizer, max_seq_length=self._limit(),
                                    max_prompt_length=self.args.max_prompt_length,
                                    chat_template=self.args.chat_template)

    def collate_batch(self, examples: list[dict]) -> dict:
        """B triples -> 3B padded rows (chosen, rejected, reference; 2B without the NLL term)."""
        return with_score_positions(collate_triples(examples, self.pad_id, with_reference=self._branches == 3))

    def count_items(self, batch: dict) -> int:
        """The micro-batch's triples."""
        return batch["input_ids"].shape[0] // self._branches

    def example_tokens(self, example: dict) -> int:
        """Its rows of prompt + the longest completion (all are padded to it)."""
        sides = ("chosen", "rejected", "reference")[:self._branches]
        return self._branches * (len(example["prompt_ids"]) + max(len(example[f"{s}_ids"]) for s in sides))

    def prepare_step(self, group, across_ranks):
        """Count the reference completions' tokens in the accumulated batch: the NLL term's normaliser."""
        n = sum(int(b["completion_mask"][2 * (b["input_ids"].shape[0] // 3):, 1:].sum()) for b in group) \
            if self._branches == 3 else 0
        self._nll_tokens = max(1.0, self.dist.sum(n) if across_ranks else n)

    def micro_batch_loss(self, batch: dict, num_items: int):
        """This micro-batch's share of the mean triple loss plus tpo_alpha x the reference completions' NLL; metrics:
        TRL's rewards/*, logps/*, logits/*, entropy (every completion token) and mean_token_accuracy (the chosen
        completions'). (TRL's TPO adds no MoE load-balancing loss, and neither does this.)"""
        args, n = self.args, batch["input_ids"].shape[0] // self._branches
        logps, entropy, extras = self.logps(batch, extras=True)  # completion tokens only
        sums_ = logps.sum(-1)
        seq = sums_ / batch["completion_mask"][:, 1:].sum(-1).clamp(min=1) if args.loss_type in MEAN_LOGPS \
            else sums_
        chosen, rejected = seq[:n], seq[n:2 * n]
        loss = tpo_losses(chosen, rejected, args).sum() / num_items
        sums = pair_sums(args.beta * chosen.detach(), args.beta * rejected.detach(), chosen, rejected)
        sums.update(token_sums(batch["completion_mask"][:, 1:], entropy, extras, slice(0, n), slice(n, 2 * n)))
        if self._branches == 3:  # (TRL folds the term into the loss without logging it apart, and so does this)
            loss = loss + args.tpo_alpha * -sums_[2 * n:].sum() / self._nll_tokens
        return self.report(loss, sums, num_items)
