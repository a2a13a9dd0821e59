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
