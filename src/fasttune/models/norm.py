"""The decoder's RMSNorm module (transformers' LlamaRMSNorm / GemmaRMSNorm / Gemma4RMSNorm): kernels/rmsnorm.py's
kernels with the weight as a parameter named as transformers names it."""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.kernels.rmsnorm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """x / rms(x) * w (Gemma: * (1 + w)), computed in fp32 (transformers' LlamaRMSNorm / GemmaRMSNorm); fp32_scale:
    w applied in fp32 before the cast (Gemma4RMSNorm), not after it (Llama's)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, fp32_scale: bool = False):
        super().__init__()
        # Gemma stores w with the scale (1 + w), so its neutral weight is 0.
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset, self.fp32_scale = eps, offset, fp32_scale

    def forward(self, x):
        """x (..., dim) -> normalised x, same shape and dtype."""
        return rms_norm(x, self.weight, self.eps, self.offset, self.fp32_scale)

    def with_residual(self, x, h=None):
        """(s, norm(s)) for s = x + h (or x): the residual stream and this norm's output, in one kernel."""
        return add_rms_norm(x, h, self.weight, self.eps, self.offset, self.fp32_scale)
