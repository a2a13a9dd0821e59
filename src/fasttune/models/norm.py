"""The decoder's RMSNorm module (transformers' LlamaRMSNorm / GemmaRMSNorm / Gemma4RMSNorm): kernels/rmsnorm.py's
kernels with the weight as a parameter named as transformers names it."""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.kernels.rmsnorm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """x / rms(x) * w (Gemma: * (1 + w)), computed in fp32 (transformers' LlamaRMSNorm / GemmaRMSNorm); fp32_scale:
    w applied in fp32 before the cast (Gemma4RMSNorm), not after it (Llama's); centered: a LayerNorm without a bias,
    (x - mean) / std * w in fp32 (transformers' CohereLayerNorm)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, fp32_scale: bool = False, centered: bool = False):
        super().__init__()
        # Gemma stores w with the scale (1 + w), so its neutral weight is 0.
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset, self.fp32_scale, self.centered = eps, offset, fp32_scale, centered

    def forward(self, x):
        """x (..., dim) -> normalised x, same shape and dtype."""
        if self.centered:
            return centered_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps, self.offset, self.fp32_scale)

    def with_residual(self, x, h=None):
        """(s, norm(s)) for s = x + h (or x): the residual stream and this norm's output, in one kernel."""
        if self.centered:
            s = x if h is None else x + h
            return s, centered_norm(s, self.weight, self.eps)
        return add_rms_norm(x, h, self.weight, self.eps, self.offset, self.fp32_scale)


def centered_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without a bias over the last dim, in fp32 and cast back: transformers' CohereLayerNorm (Cohere's
    norms; torch's layer_norm does the same arithmetic). weight (dim,), or (heads, dim) for Command R+'s per-head
    q/k norms over x (..., heads, dim)."""
    out = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], None, None, eps) * weight.float()
    return out.to(x.dtype)
