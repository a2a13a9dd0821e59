"""Sequence classification on labelled rows (data/classification.py): the loss transformers' Trainer trains a
`<Family>ForSequenceClassification` with (cross-entropy, MSE or BCE-with-logits by the head's problem type, see
models/sequence_classification.py), as a mean over the accumulated batch's labels; logs the loss and, for
single-label heads, the accuracy. transformers has no trainer of its own for this besides its Trainer, which also
runs our classifier; this one adds fasttune's loop (the CLI's `--method classification`, recompute choice, logs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttune.data.classification import LABEL_FIELD, collate_classification, tokenize_classification_rows
from fasttune.errors import ConfigError
from fasttune.models.sequence_classification import pad_like_tokenizer
from fasttune.train.config import TrainingConfig
from fasttune.train.host_reads import add_exact, host_values
from fasttune.train.loop import Trainer
from fasttune.train.objectives.eval_window import EvalWindow


@dataclass
class ClassificationConfig(TrainingConfig):
    """TrainingConfig plus the label column's name (`label_field`, "label"); the text is `dataset_text_field`'s
    column (or a `messages` list). Longer rows keep their start (drop_long=True drops them)."""

    label_field: str = LABEL_FIELD


class ClassificationTrainer(EvalWindow, Trainer):
    """Trains a sequence classifier (FastLanguageModel.from_pretrained(..., auto_model=
    AutoModelForSequenceClassification, num_labels=N)) on rows {"text", "label"}. Raises ConfigError for a language
    model, args that are not a ClassificationConfig, or packing=True; DataError for rows that do not fit the head."""

    config_cls = ClassificationConfig
    method = "classification"
    trains_classifiers = True
    supports_packing = False
    packing_refusal = "packing=True puts several rows in one; a classifier scores one row each. Set packing=False."

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args=None, **kwargs):
        args = args if args is not None else ClassificationConfig()
        if not isinstance(args, ClassificationConfig):
            raise ConfigError(f"ClassificationTrainer needs args=ClassificationConfig(...), got {type(args).__name__}.")
        if args.packing:
            raise ConfigError(self.packing_refusal)
        if not getattr(model, "is_sequence_classifier", False):
            raise ConfigError("ClassificationTrainer trains a sequence classifier; load the model with "
                              "FastLanguageModel.from_pretrained(PATH, auto_model=AutoModelForSequenceClassification, "
                              "num_labels=N) (from transformers).")
        tok = tokenizer if tokenizer is not None else kwargs.pop("processing_class", None)
        if tok is None:
            raise ConfigError("ClassificationTrainer needs a tokenizer (tokenizer=... or processing_class=...).")
        self._sums = {"train": [0.0, 0.0], "eval": [0.0, 0.0]}  # correct predictions, rows (single-label heads)
        super().__init__(model, tok, train_dataset, eval_dataset, args, config_cls=ClassificationConfig, **kwargs)
        pad_like_tokenizer(self.model.config, self.tokenizer)  # (the batches are padded with its pad token)

    def prepare(self, dataset) -> list[dict]:
        """Rows -> {"input_ids", "label"} checked against the head (tokenize_classification_rows)."""
        a = self.args
        return tokenize_classification_rows(dataset, self.tokenizer, self.model.config,
                                            text_field=a.dataset_text_field, label_field=a.label_field,
                                            max_seq_length=min(a.max_seq_length, self.model.max_seq_length
                                                               or a.max_seq_length),
                                            drop_long=a.drop_long, chat_template=a.chat_template)

    def collate_batch(self, examples: list[dict]) -> dict:
        """Examples -> right-padded rows and their labels (collate_classification)."""
        return collate_classification(examples, self.pad_id)

    def count_items(self, batch: dict) -> int:
        """The micro-batch's labels (rows; rows x classes for multi-label), as transformers' Trainer counts them."""
        return int(batch["labels"].ne(-100).sum())

    def micro_batch_loss(self, batch: dict, num_items: int):
        """The classifier's loss over this micro-batch as a sum divided by num_items (the accumulated batch's
        labels), and that sum; single-label heads also count their correct predictions."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], num_items_in_batch=num_items)
        if self.model.config.problem_type == "single_label_classification":
            sums = self._sums[self._window]
            right = (out.logits.detach().argmax(-1) == batch["labels"]).sum()
            sums[0] = add_exact(sums[0], right)
            sums[1] = add_exact(sums[1], batch["labels"].numel())
        return out.loss, out.loss.detach().to(torch.float64) * num_items

    def step_metrics(self) -> dict:
        """{"accuracy"} of the single-label predictions since the last log entry; resets."""
        return self._accuracy("train", "")

    def eval_metrics(self) -> dict:
        """{"eval_accuracy"} of the last evaluate() pass; resets."""
        return self._accuracy("eval", "eval_")

    def _accuracy(self, window: str, prefix: str) -> dict:
        right, rows = host_values(self._sums[window])
        self._sums[window] = [0.0, 0.0]
        return {f"{prefix}accuracy": right / rows} if rows else {}
