"""Reward modelling (an outcome reward model) as TRL 1.16's RewardTrainer computes it: a sequence classifier with one
output (models/sequence_classification.py) scores prompt + chosen and prompt + rejected, and the loss is the
Bradley-Terry pairwise loss -log sigmoid(r_chosen - r_rejected - margin) (Ouyang et al. 2022, eq. 1; `margin` an
optional column, as in Llama 2's reward models), plus center_rewards_coefficient x (r_chosen + r_rejected)^2
(Eisenstein et al. 2023) when set. Means over pairs; with gradient accumulation over the whole accumulated batch.
No reference model, no LM head."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fasttune.data.preference import collate_reward_pairs, tokenize_reward_rows
from fasttune.errors import ConfigError
from fasttune.models.sequence_classification import pad_like_tokenizer
from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.preference_base import PreferenceTrainer


@dataclass
class RewardConfig(TrainingConfig):
    """TrainingConfig plus TRL's RewardConfig fields, with its defaults where they differ from ours (learning_rate
    1e-4; max_seq_length, TRL's max_length, 1024: longer pairs are dropped, not cut). center_rewards_coefficient:
    None (off) or a weight >= 0. Raises ConfigError for a negative coefficient."""

    learning_rate: float = 1e-4
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's default)
    max_seq_length: int = 1024
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        super().__post_init__()
        c = self.center_rewards_coefficient
        if c is not None and not c >= 0:
            raise ConfigError(f"center_rewards_coefficient={c!r} is invalid: use None (off) or a weight >= 0, e.g. "
                              f"0.01.")


class RewardTrainer(PreferenceTrainer):
    """Trains a reward model on paired rows ({"prompt", "chosen", "rejected"}, or "chosen" / "rejected" that share
    their prompt; text or chat messages; optional "margin"), as TRL's RewardTrainer: `model` is a sequence
    classifier with num_labels=1 (FastLanguageModel.from_pretrained(..., auto_model=
    AutoModelForSequenceClassification, num_labels=1)) or a model path, which is loaded so. Logs TRL's metrics
    (accuracy, margin, mean / min / max reward). Raises ConfigError for a language model, a classifier with
    another num_labels, or args that are not a RewardConfig."""

    config_cls = RewardConfig
    method = "reward"
    trains_classifiers = True

    def __init__(self, model, tokenizer=None, train_dataset=None, eval_dataset=None, args=None, **kwargs):
        if isinstance(model, str) or hasattr(model, "__fspath__"):  # TRL's model="path": a one-output classifier
            from transformers import AutoModelForSequenceClassification

            from fasttune.api import FastModel

            model, tok = FastModel.from_pretrained(str(model), auto_model=AutoModelForSequenceClassification,
                                                   num_labels=1)
            if tokenizer is None and kwargs.get("processing_class") is None:
                tokenizer = tok
        if not getattr(model, "is_sequence_classifier", False):
            raise ConfigError("RewardTrainer trains a reward model: a sequence classifier with one output. Load it "
                              "with FastLanguageModel.from_pretrained(PATH, auto_model="
                              "AutoModelForSequenceClassification, num_labels=1) (from transformers), or pass the "
                              "path as model=.")
        if model.config.num_labels != 1:
            raise ConfigError(f"RewardTrainer needs num_labels=1 (one score per sequence); this model has "
                              f"num_labels={model.config.num_labels}. Load it with num_labels=1.")
        super().__init__(model, tokenizer, train_dataset, eval_dataset, args, **kwargs)
        pad_like_tokenizer(self.model.config, self.tokenizer)  # (the batches are padded with its pad token)

    def prepare(self, dataset) -> list[dict]:
        """Paired rows -> {"chosen_ids", "rejected_ids"} (+ "margin"); pairs longer than max_seq_length dropped."""
        return tokenize_reward_rows(dataset, self.tokenizer, max_seq_length=self._limit(),
                                    chat_template=self.args.chat_template)

    def collate_batch(self, examples: list[dict]) -> dict:
        """B pairs -> 2B right-padded rows, chosen first (collate_reward_pairs)."""
        return collate_reward_pairs(examples, self.pad_id)

    def example_tokens(self, example: dict) -> int:
        """Two rows of the longer sequence (both are padded to it)."""
        return 2 * max(len(example["chosen_ids"]), len(example["rejected_ids"]))

    def micro_batch_loss(self, batch: dict, num_items: int):
        """This micro-batch's share of the pairwise loss (+ the centring term), as sums over its pairs divided by
        num_items (the accumulated batch's pairs)."""
        rewards = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = rewards.squeeze(-1).float().chunk(2)
        diff = chosen - rejected
        if "margin" in batch:
            diff = diff - batch["margin"].to(diff.device)
        loss = -F.logsigmoid(diff).sum() / num_items
        coefficient = self.args.center_rewards_coefficient
        if coefficient is not None:
            loss = loss + coefficient * ((chosen + rejected) ** 2).sum() / num_items
        pairs, r = chosen.numel(), rewards.detach().float()
        sums = {"accuracy": ((chosen > rejected).float().sum().detach(), pairs),
                "margin": ((chosen - rejected).sum().detach(), pairs),
                "mean_reward": (r.sum(), r.numel()),
                # TRL logs each micro-batch's extreme, averaged over the logging window
                "min_reward": (r.min(), 1), "max_reward": (r.max(), 1)}
        return self.report(loss, sums, num_items)
