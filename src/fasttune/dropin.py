"""Names that scripts written for other fine-tuners import, so that switching is an import change.

`UnslothTrainer` / `UnslothTrainingArguments` are our SFTTrainer / SFTConfig (which already take
`embedding_learning_rate`); `PatchDPOTrainer()` exists because such scripts call it before building TRL's DPOTrainer:
our model needs no patching, so it does nothing.
"""
from __future__ import annotations

import torch


def is_bfloat16_supported() -> bool:
    """True when the current CUDA device computes in bfloat16 (Ampere or newer); False on CPU-only machines, where
    fasttune trains in float32 (scripts use it to pick `bf16=` / `fp16=` for their trainer)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def PatchDPOTrainer() -> None:  # noqa: N802 - the name scripts call
    """No-op, kept for scripts that call it before TRL's DPOTrainer: our model works in TRL's trainers unpatched."""
    return None


def PatchFastRL(algorithm: str | None = None, FastLanguageModel=None) -> None:  # noqa: N802,N803 - the names
    """No-op, kept for the peer's GRPO notebooks that call `PatchFastRL("GRPO", FastLanguageModel)` before TRL's
    GRPOTrainer: nothing is patched here (fasttune's GRPOTrainer is its own, and TRL's takes our model as it is)."""
    return None


def unsloth_train(trainer, *args, **kwargs):
    """`trainer.train(*args, **kwargs)`, for scripts that call the peer's unsloth_train(trainer) (its gradient
    accumulation fix, which fasttune's trainers and our model under transformers' Trainer do not need: the loss is
    divided by the accumulated batch's target count). Returns what train() returns."""
    return trainer.train(*args, **kwargs)
