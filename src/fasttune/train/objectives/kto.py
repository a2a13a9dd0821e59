"""KTO (Ethayarajh et al. 2024) as TRL 1.16 computes it, on unpaired rows (prompt, completion, label).

Summed completion log-probs of policy and reference (the policy as handed to the trainer, see ReferencePolicy); the KL term is estimated
from mismatched pairs, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}): TRL rotates the completions within each batch,
here within the whole accumulated batch of a step, so that bs 4 x GA 1 and bs 1 x GA 4 see the same estimate.
The loss is the mean over the rows of the accumulated batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fasttune.constants import MEDIA_KEYS
from fasttune.data.preference import collate_unpaired, pad_sequences, tokenize_unpaired_rows
from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.host_reads import host_values
from fasttune.train.objectives.dpo import check_beta, check_prompt_length
from fasttune.train.objectives.preference_base import PreferenceTrainer, token_sums, with_score_positions
from fasttune.train.objectives.reference_sync import ReferenceSync, check_sync_settings, synced_reference

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOConfig(TrainingConfig):
    """TrainingConfig plus KTO's fields, as in TRL's KTOConfig. Raises ConfigError for beta <= 0, max_prompt_length
    < 1, an unknown loss_type, a negative desirable_weight / undesirable_weight, and the sync settings that
    reference_sync.check_sync_settings refuses (sync_ref_model with precompute_ref_log_probs too)."""

    beta: float = 0.1
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's KTO default)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"  # kto | apo_zero_unpaired (no KL term)
    max_prompt_length: int | None = None  # keep the last tokens of longer prompts
    precompute_ref_log_probs: bool = False  # the rows' reference log-probs once before training (TRL's name)
    # TRL's MoE load-balancing loss weight; None: the model config's (so it is on for MoE models, as in TRL 1.16)
    router_aux_loss_coef: float | None = None
    # TR-DPO (reference_sync.py): every ref_model_sync_steps optimizer steps, ref <- alpha x policy + (1 - alpha) x ref
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        check_sync_settings(self, "precompute_ref_log_probs=True fixes the reference log-probs before training (as "
                                  "TRL refuses)" if self.precompute_ref_log_probs else None)
        check_prompt_length(self.max_prompt_length)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type='{self.loss_type}' is not supported by KTO; use one of {LOSS_TYPES}.")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: it must be a number >= 0.")


def weight_advice(labels: list[bool], desirable_weight: float, undesirable_weight: float) -> str | None:
    """TRL 1.16's advice for unbalanced data (Eq. 8 of the KTO paper): None when the counts are equal or one of
    the weights is in its recommended range, else the warning naming both ranges."""
    good = max(sum(labels), 1)
    bad = max(len(labels) - good, 1)
    if good == bad:
        return None
    des = (round(bad * undesirable_weight / good, 2), round(bad * undesirable_weight / good * 1.33, 2))
    und = (round(good * desirable_weight / bad / 1.33, 2), round(good * desirable_weight / bad, 2))
    if des[0] <= desirable_weight <= des[1] or und[0] <= undesirable_weight <= und[1]:
        return None
    return (f"The data has {sum(labels)} desirable and {len(labels) - sum(labels)} undesirable examples, but the "
            f"weights on the desirable and undesirable losses don't seem to be in an ideal range. Based on your data, "
            f"we recommend EITHER desirable_weight in [{des[0]}, {des[1]}] or undesirable_weight in "
            f"[{und[0]}, {und[1]}] (but NOT BOTH), as TRL does (KTO paper, Eq. 8).")


class KTOTrainer(ReferenceSync, PreferenceTrainer):
    """KTO on unpaired rows (prompt, completion, label); paired rows are split into a desirable and an undesirable
    row. The reference is the model as handed to the trainer: a ReferencePolicy, or with precompute_ref_log_probs
    the rows' log-probs computed once before training (the KL rows of loss_type="kto" are paired anew each step, so
    their reference passes remain; with full fine-tuning the ReferencePolicy is a second copy of the weights, as TRL
    keeps a reference model). Raises ConfigError for loss_type="kto" with one row per optimizer step; warns
    (UserWarning) when the weights do not fit the label balance (weight_advice)."""

    config_cls = KTOConfig
    method = "KTO"
    supports_vision = True  # rows with images on a vision-language model (data/vision_preference.py)

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args: KTOConfig | None = None,
                 **kwargs):
        super().__init__(model, tokenizer, train_dataset, eval_dataset, args, **kwargs)
        a = self.args
        if not a.precompute_ref_log_probs or a.loss_type == "kto":  # reference passes during training
            self.reference = synced_reference(model, a)
        if a.precompute_ref_log_probs:  # once, before training: the model as it is now is the reference
            for examples in [self.train_examples] + ([self.eval_examples] if self.eval_examples else []):
                for part, ref in self.logps_before_training(examples):
                    for ex, value in zip(part, ref.tolist()):
                        ex["ref_logps"] = value
        rows_per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * self.dist.world
        if a.loss_type == "kto" and rows_per_step < 2:
            # TRL refuses per_device_train_batch_size=1; we estimate the KL over the whole accumulated batch, so
            # only one row per optimizer step is degenerate.
            raise ConfigError(
                "KTO with one row per optimizer step (per_device_train_batch_size=1, gradient_accumulation_steps=1) "
                "cannot estimate the KL term: the mismatched pair is the row itself, so the KL equals its own reward "
                "and the loss is 0.5 every step. Set per_device_train_batch_size or gradient_accumulation_steps to "
                "2 or more (TRL's KTOTrainer needs per_device_train_batch_size > 1), or use "
                "loss_type='apo_zero_unpaired', which has no KL term.")
        advice = weight_advice([ex["label"] for ex in self.train_examples], a.desirable_weight,
                               a.undesirable_weight)
        if advice:
            warnings.warn(advice, UserWarning, stacklevel=2)
        self._kl = 0.0

    def prepare(self, dataset) -> list[dict]:
        """Rows -> examples with prompt_ids / completion_ids / label (see tokenize_unpaired_rows; on a
        vision-language model with the prompt's images: tokenize_vision_unpaired_rows)."""
        if self.vision:
            from fasttune.data.vision_preference import tokenize_vision_unpaired_rows

            return tokenize_vision_unpaired_rows(dataset, self.tokenizer, max_seq_length=self._limit())
        return tokenize_unpaired_rows(dataset, self.tokenizer, max_seq_length=self._limit(),
                                      max_prompt_length=self.args.max_prompt_length,
                                      chat_template=self.args.chat_template)

    def collate_batch(self, examples: list[dict]) -> dict:
        """Padded rows plus a bool `label` tensor (B,) (collate_unpaired), and the indices of the desirable and
        undesirable rows, found here on the host so that the metrics select those rows on the device without a
        sync."""
        if self.vision:
            from fasttune.data.vision_preference import collate_vision_unpaired

            batch = with_score_positions(collate_vision_unpaired(examples, self.tokenizer))
        else:
            batch = with_score_positions(collate_unpaired(examples, self.pad_id))
        rows = torch.arange(batch["label"].shape[0])
        batch["desirable_rows"], batch["undesirable_rows"] = rows[batch["label"]], rows[~batch["label"]]
        return batch

    def count_items(self, batch: dict) -> int:
        """The micro-batch's rows: the loss is a mean over rows."""
        return batch["input_ids"].shape[0]

    def example_tokens(self, example: dict) -> int:
        """Prompt plus completion tokens."""
        return len(example["prompt_ids"]) + len(example["completion_ids"])

    @torch.no_grad()
    def prepare_step(self, group, across_ranks):
        """The KL estimate of the step (loss_type="kto" only): the mean policy-minus-reference log-ratio of the
        mismatched (prompt, rotated completion) rows over the accumulated batch, clamped at 0 (as TRL)."""
        if self.args.loss_type != "kto":
            return
        prompts, completions = [], []
        for b in group:
            for ids, att, comp in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(),
                                      b["completion_mask"].tolist()):
                prompts.append([t for t, a, c in zip(ids, att, comp) if a and not c])
                completions.append([t for t, c in zip(ids, comp) if c])
        completions = completions[-1:] + completions[:-1]  # y_{i-1} after x_i
        limit, parts, start = self._limit(), [], 0
        for b in group:  # the KL rows in micro-batches of the same sizes
            n = b["input_ids"].shape[0]
            p, c = prompts[start:start + n], completions[start:start + n]
            kl = pad_sequences(p, [y[:limit - len(x)] for x, y in zip(p, c)], self.pad_id)
            kl.update({k: b[k] for k in MEDIA_KEYS if k in b})  # the prompts keep their rows, so their images
            kl = self.to_device(with_score_positions(kl))
            policy = self.logps(kl)
            parts.append((policy.sum(-1) - self.reference_logps(kl).sum(-1)).sum())
            start += n
        for _ in range(self.step_fillers if across_ranks else 0):  # FSDP: as many KL passes as the busiest rank
            filler = self.to_device(with_score_positions(self.collate_batch([self.train_examples[0]])))
            self.logps(filler), self.reference_logps(filler)
        total, count = sum(host_values(parts)), len(prompts)  # one read for the step's KL passes
        if across_ranks:
            total, count = self.dist.sum(total), self.dist.sum(count)
        self._kl = max(0.0, total / count)

    def micro_batch_loss(self, batch: dict, num_items: int):
        """The weighted KTO (or APO-zero unpaired) losses of the rows, summed and divided by num_items; metrics
        kl, rewards/*, logps/* and logits/* split by label, entropy (TRL's)."""
        a, kl = self.args, self._kl
        if "ref_logps" in batch:  # precomputed
            ref = batch["ref_logps"]
        else:  # before the policy's forward (ReferencePolicy swaps in place)
            ref = self.reference_logps(batch).sum(-1)
        aux = []  # the policy forward's MoE load-balancing loss, when on (router_aux_loss_coef)
        per_token, entropy, extras = self.logps(batch, extras=True, aux_out=aux)
        logps = per_token.sum(-1)
        ratio = logps - ref
        desirable = batch["label"]
        if a.loss_type == "kto":
            losses = torch.where(desirable, 1 - torch.sigmoid(a.beta * (ratio - kl)),
                                 1 - torch.sigmoid(a.beta * (kl - ratio)))
        else:
            losses = torch.where(desirable, 1 - torch.sigmoid(a.beta * ratio), torch.sigmoid(a.beta * ratio))
        weights = torch.where(desirable, a.desirable_weight, a.undesirable_weight)
        rewards = a.beta * ratio.detach()
        good, bad = batch["desirable_rows"], batch["undesirable_rows"]  # rows[desirable], without a sync
        sums = {"kl": (kl, 1), **token_sums(batch["completion_mask"][:, 1:], entropy, extras, good, bad,
                                              accuracy=False)}
        if good.numel():
            sums["rewards/chosen"] = (rewards.index_select(0, good).sum(), good.numel())
            sums["logps/chosen"] = (logps.detach().index_select(0, good).sum(), good.numel())
        if bad.numel():
            sums["rewards/rejected"] = (rewards.index_select(0, bad).sum(), bad.numel())
            sums["logps/rejected"] = (logps.detach().index_select(0, bad).sum(), bad.numel())
        return self.report(self.with_aux_loss((weights * losses).sum() / num_items, sums, aux), sums, num_items)
