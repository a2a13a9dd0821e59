"""DoRA (weight-decomposed low-rank adaptation; Liu et al. 2024, arXiv:2402.09353) on a LoRA layer, as PEFT computes it
(peft/tuners/lora/dora.py, DoraLinearLayer).

The adapted weight is W' = m * (W + s B A) / ||W + s B A||, the norm taken over each output row and m a trained
magnitude per output feature (PEFT's `lora_magnitude_vector`, initialised to the rows' norms so that the layer starts
equal to its base). As in PEFT (the paper's section 4.3) the norm is treated as a constant in backward, and the
output is computed without forming W':

    y = base(x) + (m / n - 1) * (x W^T) + (m / n) * s * (x A^T B^T),     n = ||W + s B A|| (detached)

with x W^T the base output without its bias (a second product with the dropped-out input when dropout is on in
training). The norm needs the whole (out, in) matrix W + s B A in every forward, which makes DoRA slower than LoRA;
these layers take the plain path (not kernels/lora.py's fused one).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttune.peft.lora_layer import LoraLinear


class DoraLinear(LoraLinear):
    """A LoraLinear with DoRA's magnitude: lora_magnitude_vector (out_features,) fp32, trained with A and B.
    forward: x (..., in_features) -> (..., out_features) in the base output's dtype (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float):
        super().__init__(base, r, scaling, dropout)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(base.out_features, device=self.lora_A.device,
                                                             dtype=torch.float32))

    def weight_norm(self, dtype: torch.dtype = torch.float32, w: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A|| over each output row, (out_features,) in `dtype` (computed in it, as PEFT does with the
        activation dtype), without gradient. w: the base weight already in `dtype` (a quantised base is then not
        dequantised again), else read from the base layer."""
        with torch.no_grad():
            w = self.base_layer.weight.to(dtype) if w is None else w
            lora = (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
            return torch.linalg.norm(w + self.scaling * lora, dim=1).to(dtype)

    def reset_magnitude(self):
        """m = ||W + s B A|| per row (PEFT's DoraLinearLayer.update_layer), so the layer equals its base when B = 0."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(torch.float32))

    def reset_parameters(self):
        """LoRA's init (lora_A kaiming-uniform, lora_B zeros), then the magnitude from the resulting weight."""
        super().reset_parameters()
        self.reset_magnitude()

    def delta_weight(self) -> torch.Tensor:
        """W' - W in fp32 (out_features, in_features): what merging adds to the base weight (export/merged.py)."""
        w = self.base_layer.weight.float()
        merged = w + (self.lora_B @ self.lora_A) * self.scaling
        norm = torch.linalg.norm(merged, dim=1).detach()
        return (self.lora_magnitude_vector / norm)[:, None] * merged - w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the module docstring; `disabled` gives the base output."""
        out = self.base_layer(x)
        if self.disabled:
            return out
        dtype = x.dtype
        w = self.base_layer.weight.to(dtype)  # read (dequantised) once per forward
        # m / n in fp32, as PEFT's fp32 magnitude makes it; the two terms are then summed in fp32 and rounded once
        scale = (self.lora_magnitude_vector / self.weight_norm(dtype, w).float()).view(*([1] * (out.dim() - 1)), -1)
        dropped = self.lora_dropout(x)
        lora = (dropped @ self.lora_A.to(dtype).t()) @ self.lora_B.to(dtype).t()
        if dropped is x or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = out if bias is None else out - bias.to(out.dtype)
        else:  # PEFT: with dropout in training the base product is taken again on the dropped-out input
            base = F.linear(dropped, w)
        return (out + (scale - 1) * base + scale * lora * self.scaling).to(out.dtype)
