"""A reward model as a GRPO reward function, as TRL 1.16's GRPOTrainer uses one: a sequence classifier with one
output (fasttune's SequenceClassifier, e.g. trained with RewardTrainer, or transformers'
AutoModelForSequenceClassification) scores each prompt + completion, and its first logit is the reward.

The text it scores is TRL's: for chat prompts the reward model's own chat template over the prompt's messages and
the completion's (no generation prompt), for string prompts the prompt and the completion concatenated; it is
tokenized with the reward model's tokenizer without special tokens and right-padded, and the classifier scores each
row's last token that is not its pad token (so the model's pad_token_id is set to the tokenizer's, as TRL sets it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from fasttune.errors import ConfigError


class RewardModelFunc:
    """Call as a reward function: f(prompts, completions, **columns) -> list[float], one reward per completion.

    Args:
        model: an nn.Module with a transformers-style config whose forward(input_ids, attention_mask) returns
            `.logits` (B, num_labels); logits[:, 0] is the reward. Put in eval mode and moved to `device`.
        tokenizer: its tokenizer (with a chat template for chat prompts); a missing pad token becomes its EOS.
        batch_size: rows per forward pass (the completions are scored in chunks of this many).
        device: where the model runs (the policy's device).
        name: the name of its metrics (default: the last part of the model's name_or_path, as TRL names it).
        template_kwargs: chat-template variables for chat prompts (TRL's chat_template_kwargs).
    Raises ConfigError for a tokenizer with neither a pad nor an EOS token.
    """

    needs_columns = ()

    def __init__(self, model, tokenizer, batch_size: int, device, name: str | None = None,
                 template_kwargs: dict | None = None):
        from fasttune.models.sequence_classification import pad_like_tokenizer

        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ConfigError("The reward model's tokenizer has neither a pad token nor an EOS token; set "
                                  "tokenizer.pad_token before passing it in reward_processing_classes.")
            tokenizer.pad_token = tokenizer.eos_token  # as TRL
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        pad_like_tokenizer(config, tokenizer)
        self.model, self.tokenizer, self.batch_size = model.to(device).eval(), tokenizer, max(1, batch_size)
        self.__name__ = name or Path(str(getattr(model.config, "_name_or_path", "") or "")).name or "reward_model"
        self.template_kwargs = dict(template_kwargs or {})

    def texts(self, prompts: list, completions: list) -> list[str]:
        """What the reward model reads for each prompt + completion (see the module docstring)."""
        if isinstance(prompts[0], str):
            return [p + (c if isinstance(c, str) else c[-1]["content"]) for p, c in zip(prompts, completions)]
        return [self.tokenizer.apply_chat_template(list(p) + list(c), tokenize=False, **self.template_kwargs)
                for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False)
            logits = self.model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device)).logits
            out.extend(logits[:, 0].float().tolist())
        return out


def trainer_reward_funcs(funcs, processing_classes, field: str, max_completion_length: int, batch_size: int,
                         policy, template_kwargs: dict | None = None) -> list:
    """The reward functions of a GRPO / RLOO trainer, as callables: names resolved (rewards.resolve_reward_funcs;
    a `model:<folder>` loaded by load_reward_model in the policy's dtype), each nn.Module (a reward model) wrapped as
    a RewardModelFunc with its entry of `processing_classes` (a tokenizer, a list of one per function, or None:
    then the tokenizer saved beside the model's local folder is loaded); reward models run on the policy's device,
    in chunks of batch_size, rendering chat prompts with template_kwargs. Raises ConfigError naming `field` for names that do not resolve, a list of processing
    classes whose length differs from the functions', or a reward model without a tokenizer."""
    from fasttune.train.rewards import RewardModelFolder, resolve_reward_funcs

    if funcs is not None and not isinstance(funcs, str):
        funcs = _wrap_modules(list(funcs) if isinstance(funcs, (list, tuple)) else [funcs], processing_classes,
                              batch_size, policy.device, template_kwargs)
    resolved = resolve_reward_funcs(funcs, max_completion_length, field)
    return [load_reward_model(f.folder, batch_size, policy.device, policy.dtype, f.__name__, template_kwargs)
            if isinstance(f, RewardModelFolder) else f for f in resolved]


def _wrap_modules(funcs: list, processing_classes, batch_size: int, device, template_kwargs=None) -> list:
    from torch import nn

    if processing_classes is None or not isinstance(processing_classes, (list, tuple)):
        processing_classes = [processing_classes] * len(funcs)
    if len(processing_classes) != len(funcs):
        raise ConfigError(f"reward_processing_classes has {len(processing_classes)} entries for {len(funcs)} reward "
                          f"functions; give one per function (None for plain functions).")
    out = []
    for func, tok in zip(funcs, processing_classes):
        if isinstance(func, nn.Module):
            tok = tok if tok is not None else _saved_tokenizer(func)
            func = RewardModelFunc(func, tok, batch_size, device, template_kwargs=template_kwargs)
        out.append(func)
    return out


def load_reward_model(folder: Path, batch_size: int, device, dtype, name: str,
                      template_kwargs: dict | None = None) -> RewardModelFunc:
    """The reward model saved in `folder` (rewards.RewardModelFolder) loaded by FastLanguageModel.from_pretrained
    (a classifier checkpoint, or an adapter folder with classifier_head.json) in `dtype` on `device`, with the
    tokenizer saved beside it; `name` names its metrics. Raises ConfigError when the folder holds no sequence
    classifier or no tokenizer."""
    from fasttune.api import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=dtype, device=str(device))
    if not getattr(model, "is_sequence_classifier", False):
        raise ConfigError(f"reward_funcs: 'model:{folder}' holds a language model, not a reward model (a sequence "
                          f"classifier with a score head). Train one with RewardTrainer or `fasttune train --method "
                          f"reward`, and name its output folder.")
    if tok is None:
        raise ConfigError(f"reward_funcs: 'model:{folder}' has no tokenizer; save one beside the weights.")
    model.requires_grad_(False)
    return RewardModelFunc(model, tok, batch_size, device, name, template_kwargs)


def _saved_tokenizer(model):
    folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if str(folder) and folder.is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            pass
    raise ConfigError(f"The reward model {type(model).__name__} has no tokenizer: pass it in "
                      f"reward_processing_classes=[tokenizer] (one entry per reward function, None for functions).")
