"""The LoRA layer on a linear layer (PEFT's lora.Linear): a frozen base Linear (or QuantLinear) plus a trainable
low-rank update, and whether a group of them takes kernels/lora.py's fused path. Kept apart from peft/lora.py (which
applies adapters to a model) so that peft/dora.py can build on it."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fasttune.kernels.lora import fused_lora_enabled, lora_group


def init_lora_A(t: torch.Tensor) -> torch.Tensor:
    """PEFT's default init of a lora_A (r, in) (or a stack of them): kaiming-uniform with a=sqrt(5), in place, from
    torch's global generator of t's device; with lora_B zero the adapter starts as the identity. Returns t."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoraLinear(nn.Module):
    """A frozen base Linear (or QuantLinear) plus a trainable low-rank update, as PEFT's lora.Linear: y = base(x) +
    scaling * dropout(x) @ A^T @ B^T, with lora_A (r, in_features) and lora_B (out_features, r) fp32 master weights cast
    to x's dtype. `disabled` turns the update off (set_adapters_enabled)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base  # nn.Linear, or a QuantLinear (NF4 / int8 storage)
        self.r, self.scaling = r, scaling
        device = next(base.buffers()).device if is_quantized(base) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (out_features, in_features) weight, without the LoRA update (dequantised, a new tensor, for
        a QuantLinear base)."""
        return self.base_layer.weight

    def reset_parameters(self):
        """PEFT's default init: lora_A kaiming-uniform (a=sqrt(5)), lora_B zeros, so the layer starts equal to its base.
        Draws from torch's global generator."""
        init_lora_A(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scaling * (lora_B @ lora_A): the (out_features, in_features) update to the base weight, in the adapter's
        dtype (fp32)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in the base output's dtype: base(x) plus the LoRA update unless
        disabled; through kernels/lora.py's fused function when can_fuse allows it."""
        if not self.disabled and can_fuse(x, (self,)):
            return lora_group(x, (self,))[0]  # hand-derived backward (kernels/lora.py)
        out = self.base_layer(x)
        if self.disabled:
            return out
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        xa = (self.lora_dropout(x) @ a.t()).flatten(0, -2)
        # One GEMM adds the scaled low-rank product into the base output (no separate scale and add passes).
        return torch.addmm(out.flatten(0, -2), xa, b.t(), alpha=self.scaling).view(out.shape)


def can_fuse(x: torch.Tensor, layers) -> bool:
    """True when `layers` are all plain (not subclassed), enabled LoRA layers with a frozen base and the fused
    kernel path (kernels/lora.py) is on for `x`."""
    if not fused_lora_enabled(x):
        return False
    return all(type(layer) is LoraLinear and not layer.disabled and not _base_trains(layer) for layer in layers)


def _base_trains(layer) -> bool:
    base = layer.base_layer
    return any(p.requires_grad for p in base.parameters(recurse=False))


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a QuantLinear (NF4 or int8 storage; quant/linear.py)."""
    from fasttune.quant.linear import QuantLinear

    return isinstance(module, QuantLinear)
