"""What DPO, ORPO and KTO share over the trainer core: preference data, batches, metrics, the reference pass.

An objective implements the core's `micro_batch_loss(batch, num_items)` and ends it with
`return self.report(loss already divided by the step's normaliser, metric sums, num_items)`; metric sums are
{name: (sum, count)} and are averaged over the logging window (train or eval) under TRL's names. Objectives whose
loss needs statistics of the whole accumulated batch take them in `prepare_step(group, across_ranks)`.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from fasttune.constants import MEDIA_KEYS
from fasttune.data.preference import collate_pairs, tokenize_preference_rows
from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.host_reads import add_exact, host_values
from fasttune.train.loop import Trainer
from fasttune.train.objectives.eval_window import EvalWindow
from fasttune.train.trl_args import apply_router_aux_loss_coef, load_named_model
from fasttune.train.objectives.reference import ReferencePolicy, model_token_logprobs, score_positions

DATA_FORMATS = ("auto", "preference")
SCORE_MASKS = ("completion_mask", "attention_mask")  # the masks whose tokens objectives score (logps)


def with_score_positions(batch: dict) -> dict:
    """Add `<mask>_positions` (score_positions of mask[:, 1:]) for each of SCORE_MASKS in a batch on the host, so
    that logps selects the scored tokens on the device without a sync."""
    for key in SCORE_MASKS:
        if key in batch:
            batch[f"{key}_positions"] = score_positions(batch[key][:, 1:])
    return batch


class PreferenceTrainer(EvalWindow, Trainer):
    """The base of DPOTrainer, ORPOTrainer and KTOTrainer; subclasses set `config_cls`, `method` and
    `micro_batch_loss`. Raises ConfigError for args of another config class, packing=True, a data_format other
    than "auto" / "preference", or no tokenizer (`tokenizer` or `processing_class`)."""

    config_cls = TrainingConfig
    method = "preference"
    supports_packing = False
    supports_vision = False  # DPO: rows with images on a vision-language model (data/vision_preference.py)
    packing_refusal = "packing=True is for SFT; set packing=False for {method}."
    reference: ReferencePolicy | None = None  # set by the objectives that compare with a reference

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args=None, **kwargs):
        args = args if args is not None else self.config_cls()
        if not isinstance(args, self.config_cls):
            raise ConfigError(f"{type(self).__name__} needs args={self.config_cls.__name__}(...), got "
                              f"{type(args).__name__}.")
        if args.packing:
            raise ConfigError(f"packing=True is for SFT; {self.method} scores whole prompt + completion rows. Set "
                              f"packing=False.")
        if args.data_format not in DATA_FORMATS:
            raise ConfigError(f"data_format='{args.data_format}' does not fit {self.method}, which reads preference "
                              f"rows; use data_format='auto' (or 'preference').")
        model, tok = load_named_model(model, tokenizer if tokenizer is not None else
                                      kwargs.pop("processing_class", None))
        if tok is None:
            raise ConfigError(f"{type(self).__name__} needs a tokenizer (tokenizer=... or processing_class=...).")
        if args.chat_template:
            from fasttune.data.templates import resolve_chat_template

            tok.chat_template = resolve_chat_template(args.chat_template)  # kept on the tokenizer saved later
        self._sums = {"train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}
        self._window = "train"  # the metric sums report() adds to: "eval" during eval_batch_loss
        self.vision = self.supports_vision and getattr(model, "family", None) is not None
        if self.vision:
            from fasttune.data.vision_prompts import require_processor

            require_processor(tok, type(self).__name__)
        super().__init__(model, tok, train_dataset, eval_dataset, args, config_cls=self.config_cls, **kwargs)
        if hasattr(self.args, "router_aux_loss_coef"):  # DPO / KTO: TRL's MoE load-balancing loss, on by default
            apply_router_aux_loss_coef(self.model, self.args.router_aux_loss_coef)

    # --- data -------------------------------------------------------------------------------------------------------
    def _limit(self) -> int:
        a = self.args
        return min(a.max_seq_length, self.model.max_seq_length or a.max_seq_length)

    def prepare(self, dataset) -> list[dict]:
        """Paired rows -> examples with prompt_ids / chosen_ids / rejected_ids (see tokenize_preference_rows),
        cut to max_seq_length and max_prompt_length; on a vision-language model with the prompt's images too
        (data/vision_preference.py)."""
        if self.vision:
            from fasttune.data.vision_preference import tokenize_vision_preference_rows

            return tokenize_vision_preference_rows(dataset, self.tokenizer, max_seq_length=self._limit())
        return tokenize_preference_rows(dataset, self.tokenizer, max_seq_length=self._limit(),
                                        max_prompt_length=self.args.max_prompt_length,
                                        chat_template=self.args.chat_template)

    def collate_batch(self, examples: list[dict]) -> dict:
        """B pairs -> 2B padded rows, chosen first (collate_pairs; with the pairs' images on a vision-language
        model), with their score positions."""
        if self.vision:
            from fasttune.data.vision_preference import collate_vision_pairs

            return with_score_positions(collate_vision_pairs(examples, self.tokenizer))
        return with_score_positions(collate_pairs(examples, self.pad_id))

    def count_items(self, batch: dict) -> int:
        """The micro-batch's pairs (half its rows)."""
        return batch["input_ids"].shape[0] // 2  # pairs: TRL's losses are means over pairs

    def example_tokens(self, example: dict) -> int:
        """Two rows of prompt + the longer completion (both are padded to it)."""
        return 2 * (len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])))

    # --- model passes -----------------------------------------------------------------------------------------------
    def logps(self, batch: dict, score: str = "completion_mask", extras: bool = False, aux_out: list | None = None):
        """Per-token log-probs (B, T-1) of the tokens that the mask batch[score] marks (default: the completions)
        under the policy; extras=True: (log-probs, entropies, extras (B, T-1, 3)) as model_token_logprobs gives
        them (the token metrics and WPO's weights); aux_out: see model_token_logprobs."""
        media = {k: batch[k] for k in MEDIA_KEYS if k in batch} if self.vision else None
        return model_token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch[score],
                                    batch.get(f"{score}_positions"), media=media, extras=extras, aux_out=aux_out)

    def with_aux_loss(self, loss: torch.Tensor, sums: dict, aux: list) -> torch.Tensor:
        """loss (already divided by the step's normaliser) plus, when the policy's forward gave the MoE
        load-balancing loss (`aux`: model_token_logprobs' aux_out), its share as TRL adds it (aux_loss_share); logs
        `aux_loss` (TRL's metric)."""
        if not aux:
            return loss
        sums["aux_loss"] = (aux[0].detach().float(), 1)
        return loss + self.aux_loss_share(aux[0].to(loss.device)).to(loss.dtype)

    def sequence_logps(self, per_token: torch.Tensor, batch: dict) -> torch.Tensor:
        """(rows,) completion log-probs of per-token ones (rows, T-1): their sums (DPO's ld_alpha weighs them)."""
        return per_token.sum(-1)

    @torch.no_grad()
    def logps_before_training(self, examples: list[dict]):
        """precompute_ref_log_probs: the summed completion log-probs of the collated rows of `examples` under the
        model as it is now (the policy as handed to the trainer is the reference), in chunks of
        per_device_eval_batch_size. Yields (chunk of examples, (rows,) float CPU tensor in collate_batch's row
        order)."""
        was_training = self.model.training
        self.model.eval()
        try:
            bs = self.args.per_device_eval_batch_size
            for i in range(0, len(examples), bs):
                part = examples[i:i + bs]
                batch = self.to_device(self.collate_batch(part))
                yield part, self.sequence_logps(self.logps(batch), batch).cpu()
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def reference_logps(self, batch: dict, score: str = "completion_mask") -> torch.Tensor:
        """Per-token log-probs under the reference policy (the model as handed to the trainer). Call it before the
        policy's forward of the same batch (see ReferencePolicy)."""
        with self.reference.active():
            return self.logps(batch, score)

    # --- the core's hooks -------------------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's loss sum divided by num_items; each objective's own, returning through report()."""
        raise NotImplementedError

    def report(self, loss: torch.Tensor, sums: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What micro_batch_loss returns: (loss, this micro-batch's share of the logged step loss), with the metric
        sums {metric: (sum, count)} added to the current log window (on the device, read when logged)."""
        self._add(self._sums[self._window], sums)
        # The core logs sum(part) / num_items as the step loss: report this micro-batch's share of it (in float64,
        # as float(loss) * num_items; the core reads it once per step).
        return loss, loss.detach().to(torch.float64) * num_items

    def step_metrics(self) -> dict:
        """TRL's metrics (rewards/*, logps/*, ...) averaged since the last log entry, plus rewards/margins; resets."""
        return self._with_tokens(self._averages("train", ""), "")

    def eval_metrics(self) -> dict:
        """The same metrics for the last evaluate() pass, prefixed "eval_"; resets them."""
        return self._with_tokens(self._averages("eval", "eval_"), "eval_")

    def _with_tokens(self, metrics: dict, prefix: str) -> dict:
        """TRL's DPO also logs num_tokens: the input tokens trained on so far, all ranks (the eval entry too)."""
        if f"{prefix}entropy" in metrics:
            metrics[f"{prefix}num_tokens"] = float(getattr(self, "tokens_seen", None) or 0)
        return metrics

    @staticmethod
    def _add(acc, sums: dict):
        """Add {metric: (sum, count)} to the running sums; tensors stay on the device until _averages reads them."""
        for k, (s, n) in sums.items():
            acc[k][0] = add_exact(acc[k][0], s)
            acc[k][1] = add_exact(acc[k][1], n)

    def _averages(self, mode: str, prefix: str) -> dict:
        acc = self._sums[mode]
        values = iter(host_values([x for pair in acc.values() for x in pair]))  # one read for all the metrics
        totals = {k: (next(values), next(values)) for k in acc}
        out = {f"{prefix}{k}": s / n for k, (s, n) in totals.items() if n}
        if f"{prefix}rewards/chosen" in out and f"{prefix}rewards/rejected" in out:
            out[f"{prefix}rewards/margins"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
        acc.clear()
        return out


def token_sums(mask: torch.Tensor, entropy: torch.Tensor, extras: torch.Tensor, chosen_rows, rejected_rows,
               accuracy: bool = True) -> dict:
    """TRL's token metrics of one micro-batch (DPO's and KTO's), each the micro-batch's mean over its completion
    tokens, reported with count 1 (TRL averages the micro-batches' means): `entropy` (all rows), `logits/chosen` /
    `logits/rejected` (the mean logit over the vocabulary, of the chosen / rejected rows: a slice or an index
    tensor; an empty one is left out, as TRL logs nothing for it), and with `accuracy` `mean_token_accuracy` (chosen
    rows: the share whose label is the first argmax). mask (rows, n) marks the completion tokens of entropy
    (rows, n) and extras (rows, n, 3) (model_token_logprobs' order)."""
    m, x = mask.to(entropy.dtype), extras.detach()

    def mean(values, weights):
        """The weights-weighted mean of values (same shape), 0 without weight."""
        return (values * weights).sum() / weights.sum().clamp(min=1)

    def rows(t, which):
        """t's rows picked by a slice or an index tensor."""
        return t[which] if isinstance(which, slice) else t.index_select(0, which)

    out = {"entropy": (mean(entropy.detach(), m), 1)}
    for name, which in (("chosen", chosen_rows), ("rejected", rejected_rows)):
        if rows(m, which).shape[0]:
            out[f"logits/{name}"] = (mean(rows(x, which)[..., 0], rows(m, which)), 1)
    if accuracy:
        out["mean_token_accuracy"] = (mean(rows(x, chosen_rows)[..., 1], rows(m, chosen_rows)), 1)
    return out


def pair_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
              rejected_logps: torch.Tensor) -> dict:
    """TRL's paired metrics as (sum, count) over this micro-batch's pairs."""
    n = chosen_rewards.numel()
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": (c.sum(), n), "rewards/rejected": (r.sum(), n),
            "rewards/accuracies": ((c > r).float().sum(), n),
            "logps/chosen": (chosen_logps.detach().sum(), n), "logps/rejected": (rejected_logps.detach().sum(), n)}
