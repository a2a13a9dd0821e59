"""FP8 storage of frozen weights with one scale per output row (`load_in_fp8=True`), multiplied in FP8.

Each (out, in) weight is stored as float8_e4m3fn values and an fp32 scale per row, max|row| / 448, so a weight
takes one byte (8B model: ~7.5 GB of linear weights instead of ~15 GB in 16 bits). The layers multiply in FP8 with
the activations quantised per token (kernels/fp8.py: torch._scaled_mm's row-wise scaling on GPUs of compute
capability >= 8.9), as torchao's float8 "rowwise" recipe does; LoRA adapters stay 16/32-bit.

Checkpoint keys follow compressed-tensors' FP8 "channel" strategy (llm-compressor's FP8-dynamic releases):
`<module>.weight` (float8_e4m3fn (out, in)) and `<module>.weight_scale` (fp32 (out, 1)), the scale itself (weight
~= value x scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttune.kernels.fp8 import quantize_rows_reference


@dataclass
class FP8State:
    """One weight in FP8 with row-wise scales; `dtype` is the dtype it was quantised from (what it dequantises to by
    default)."""

    weight: torch.Tensor   # float8_e4m3fn (out, in)
    scale: torch.Tensor    # fp32 (out,): each row's max |w| / 448
    dtype: torch.dtype
    quant_type = "fp8"  # a class attribute, not a field

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix's (out, in) shape."""
        return tuple(self.weight.shape)

    def to(self, device) -> "FP8State":
        """A copy of the state on `device`."""
        return FP8State(self.weight.to(device), self.scale.to(device), self.dtype)

    def nbytes(self) -> int:
        """Bytes of storage: one a weight plus four a row scale."""
        return self.weight.numel() + self.scale.numel() * 4


def quantize_fp8_rows(weight: torch.Tensor) -> FP8State:
    """A 2-D weight (out, in) as FP8State: each row divided by max|row| / 448 and rounded to the nearest e4m3 value
    (kernels/fp8.py's quantize_rows_reference, the rounding the activations get); an all-zero row stays zero."""
    q, s = quantize_rows_reference(weight.detach())
    return FP8State(q, s.view(-1), weight.dtype)


def dequantize_fp8_rows(state: FP8State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """value x row scale as an (out, in) tensor in `dtype` (default: the state's original dtype)."""
    return (state.weight.float() * state.scale.unsqueeze(1)).to(dtype or state.dtype)


def state_to_tensors(state: FP8State, prefix: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' channel-wise FP8 keys; `prefix` is the module's name plus a dot."""
    return {f"{prefix}weight": state.weight, f"{prefix}weight_scale": state.scale.view(-1, 1)}
