"""GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models") as TRL 1.16's experimental GKDTrainer
computes it: conversations whose last assistant turn is the dataset's completion; for each micro-batch, with
probability `lmbda` the student samples the completions from the prompts (on-policy), else with `seq_kd` the
teacher samples them, else the dataset's are used. The loss is the generalized JSD (`beta`; 0: forward KL
teacher || student, 1: reverse KL) between the student's and the teacher's next-token distributions at every
completion token, at temperature 1 (the sampling `temperature` does not enter the loss, as in TRL's GKD), summed
over the step's completion tokens and divided by their count. Evaluation scores the dataset's completions.

Tokens follow TRL's DataCollatorForChatML: the whole conversation is rendered with the chat template and tokenized
once; the prompt is its tokens before the first one that starts at or after the end of the rendered prompt
(messages[:-1] with the assistant header), the completion the rest (the end-of-turn tokens included).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

from fasttune.data.formats import row_label
from fasttune.data.sources import load_rows, source_name
from fasttune.errors import ConfigError, DataError
from fasttune.train.objectives.distillation import DistillationConfig, DistillationTrainer

__all__ = ["GKDTrainer", "GKDConfig"]


@dataclass
class GKDConfig(DistillationConfig):
    """DistillationConfig with TRL's GKDConfig fields and defaults: lmbda (the share of on-policy micro-batches),
    beta 0.5 (the generalized JSD), temperature 0.9 (sampling only), max_new_tokens 128 (the sampled completions'
    limit: sets max_completion_length), seq_kd (the teacher samples the off-policy completions). Raises ConfigError
    for lmbda outside [0, 1] or what DistillationConfig refuses."""

    lmbda: float = 0.5
    beta: float = 0.5
    temperature: float = 0.9
    max_new_tokens: int = 128
    seq_kd: bool = False
    disable_dropout: bool = True

    def __post_init__(self):
        self.max_completion_length = self.max_new_tokens
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda={self.lmbda} is invalid: the probability of an on-policy (student-sampled) "
                              f"micro-batch, in [0, 1].")


class GKDTrainer(DistillationTrainer):
    """GKD of `teacher_model` into `model` on conversations (`messages`, the last one the assistant's) or
    prompt / completion rows, as TRL 1.16's experimental GKDTrainer (same arguments; data_collator must be None,
    fasttune builds the batches). Text models only. Raises ConfigError for args that are not a GKDConfig, a
    data_collator, a vision-language model, and what DistillationTrainer refuses; DataError naming the row for rows
    without a completion, or longer than max_seq_length (unless drop_long)."""

    config_cls = GKDConfig
    prompt_only_rows = False  # whether a conversation may end with the user's turn (no completion: sampled only)

    def __init__(self, model, teacher_model=None, args: GKDConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, tokenizer=None, **kwargs):
        if data_collator is not None:
            raise ConfigError("GKDTrainer builds its own batches (TRL's DataCollatorForChatML layout); leave "
                              "data_collator unset.")
        self._dataset_only = False  # evaluation: the dataset's completions
        self._warned_prefix = False  # one warning for a template whose conversation does not start with its prompt
        super().__init__(model, teacher_model, args, train_dataset, eval_dataset, processing_class, tokenizer,
                         **kwargs)

    @property
    def loss_temperature(self) -> float:
        """1: TRL's GKD divides neither model's logits in the loss (its temperature is the sampler's)."""
        return 1.0

    # --- data ---------------------------------------------------------------------------------------------------
    def prepare(self, dataset) -> list[dict]:
        """Rows with `messages` (the last message the assistant's), or `prompt` and `completion` (strings, or
        message lists) -> examples with prompt_ids (the conversation's tokens before the completion's) and
        completion_ids (TRL's DataCollatorForChatML split; module docstring)."""
        if self.vision:
            raise ConfigError("GKDTrainer trains text models; for a vision-language student use DistillationTrainer "
                              "(on-policy distillation with images).")
        a, tok = self.args, self.tokenizer
        rows, name = load_rows(dataset), source_name(dataset)
        model_limit = min(a.max_seq_length, self.model.max_seq_length or a.max_seq_length)
        examples = []
        for i, row in enumerate(rows):
            where = row_label(i, name)
            prompt, text, full = self._rendered(row, where)
            enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            cut = next((j for j, (start, _) in enumerate(offsets) if start >= len(text)), len(ids))
            if full == text and self.prompt_only_rows:  # a prompt-only conversation
                cut = len(ids)
            elif cut == len(ids):
                raise DataError(f"{where}: the completion encodes to no tokens after the prompt; give a non-empty "
                                f"last assistant message.")
            if len(ids) > model_limit or cut + a.max_new_tokens > model_limit:
                if a.drop_long:
                    continue
                raise DataError(f"{where}: {len(ids)} tokens (prompt {cut}); the conversation, and the prompt plus "
                                f"max_new_tokens={a.max_new_tokens}, must fit max_seq_length={model_limit}. Shorten "
                                f"it, raise max_seq_length, or set drop_long=True to skip such rows.")
            examples.append({"prompt": prompt, "prompt_ids": ids[:cut], "input_ids": ids[:cut],
                             "completion_ids": ids[cut:], "columns": {}, "images": []})
        if not examples:
            raise DataError("No usable rows: every conversation was longer than max_seq_length and drop_long=True.")
        return examples

    def _rendered(self, row: dict, where: str) -> tuple:
        """(the prompt as logged, the rendered prompt text, the rendered conversation) of a row."""
        tok, kwargs = self.tokenizer, self.args.chat_template_kwargs or {}
        messages = row.get("messages")
        if messages is None and isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
            messages = list(row["prompt"]) + list(row["completion"])
        if messages is not None and self.prompt_only_rows and isinstance(messages, list) and messages and \
                isinstance(messages[-1], dict) and messages[-1].get("role") != "assistant":
            if not getattr(tok, "chat_template", None):
                raise DataError(f"{where}: conversational rows need a tokenizer with a chat template; set one "
                                f"(chat_template=...).")
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            return messages, text, text
        if messages is not None:
            if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) or \
                    messages[-1].get("role") != "assistant":
                raise DataError(f"{where}: field 'messages' must be a conversation of at least two messages whose "
                                f"last one is the assistant's (the completion GKD distils on).")
            if not getattr(tok, "chat_template", None):
                raise DataError(f"{where}: conversational rows need a tokenizer with a chat template; set one "
                                f"(chat_template=...) or give plain 'prompt' / 'completion' strings.")
            prompt = messages[:-1]
            text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
            full = tok.apply_chat_template(messages, tokenize=False, **kwargs)
            if not full.startswith(text) and not self._warned_prefix:
                # TRL splits at the rendered prompt's length all the same; so do we, once told
                self._warned_prefix = True
                warnings.warn(f"{where}: the chat template renders the whole conversation without the rendered "
                              f"prompt as its start; the completion is taken from the first token past the prompt's "
                              f"length, as TRL's DataCollatorForChatML does, which may cut it in the wrong place.")
            return prompt, text, full
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion:
            raise DataError(f"{where}: GKD rows need 'messages' (a conversation ending with the assistant's turn) "
                            f"or non-empty 'prompt' and 'completion' strings.")
        return prompt, prompt, prompt + completion

    # --- sampling: per micro-batch, the student's, the teacher's or the dataset's completions -------------------
    @torch.no_grad()
    def rollout(self, examples: list[dict], sizes: list[int], seed: int, group: int | None = None,
                across_ranks: bool = False) -> list[dict]:
        """Each micro-batch of `sizes` draws its completions' source (seeded by `seed`): the student with
        probability lmbda, else the teacher with seq_kd, else the dataset; the student's and the teacher's
        micro-batches are sampled in one generate call each. Evaluation takes the dataset's."""
        a, rng = self.args, random.Random(seed)
        sources = []
        for n in sizes:
            pick = "data" if self._dataset_only else "student" if rng.random() <= a.lmbda else \
                "teacher" if a.seq_kd else "data"
            sources += [pick] * n
        completions = [list(ex["completion_ids"]) for ex in examples]
        truncated = [False] * len(examples)
        # (FSDP: the student samples gathered whole, as GRPO's rollout does, and with seq_kd the teacher too; each
        # rank runs its own generate calls)
        with self.gathered(self.teacher if a.seq_kd else None):
            for pick, model in (("student", None), ("teacher", self.teacher)):
                where = [i for i, s in enumerate(sources) if s == pick]
                if where:
                    ids, cut = self.sample([examples[i] for i in where], seed, model=model)
                    for i, c, t in zip(where, ids, cut):
                        completions[i], truncated[i] = c, t
            return self.score(examples, completions, truncated, sizes, group, across_ranks)

    @torch.no_grad()
    def evaluation_pass(self, dataset=None, metric_key_prefix: str = "eval") -> dict:
        """DistillationTrainer's evaluation on the dataset's completions (TRL's GKD evaluates its batches as they
        are)."""
        self._dataset_only = True
        try:
            return super().evaluation_pass(dataset, metric_key_prefix)
        finally:
            self._dataset_only = False
