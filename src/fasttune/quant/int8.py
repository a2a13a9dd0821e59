"""Int8 storage of frozen weights in bitsandbytes' LLM.int8 layout: row-wise absmax ("SCB", fp32) and
round(w * 127 / absmax) as int8. Checkpoint keys: `<module>.weight` (int8), `<module>.SCB`, `<module>.weight_format`.

Unlike bitsandbytes' Linear8bitLt we do not quantise the activations: the weight is dequantised to the compute
dtype and multiplied in 16 bits (weight-only int8), which keeps LoRA gradients at 16-bit accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int8State:
    """One int8-quantised matrix in bitsandbytes' LLM.int8 row-wise layout; `dtype` is the dtype it was quantised
    from (what it dequantises to by default)."""

    weight: torch.Tensor   # int8 (out, in)
    scb: torch.Tensor      # fp32 (out,): each row's absmax
    dtype: torch.dtype
    quant_type = "int8"  # a class attribute, not a field

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix's (out, in) shape."""
        return tuple(self.weight.shape)

    def to(self, device) -> "Int8State":
        """A copy of the state on `device`."""
        return Int8State(self.weight.to(device), self.scb.to(device), self.dtype)

    def nbytes(self) -> int:
        """Bytes of storage: one a weight plus four an SCB row."""
        return self.weight.numel() + self.scb.numel() * 4


def quantize_int8(weight: torch.Tensor) -> Int8State:
    """Row-wise absmax int8 of a 2-D weight (out, in), as bitsandbytes stores LLM.int8 weights (LLM.int8 paper,
    Dettmers et al. 2022): round(w * 127 / absmax(row)); an all-zero row stays zero."""
    w = weight.detach().float()
    scb = w.abs().amax(dim=1)
    q = torch.round(w * (127.0 / scb.unsqueeze(1))).to(torch.int8)  # an all-zero row gives nan -> 0 below
    return Int8State(torch.where(scb.unsqueeze(1) > 0, q, 0).to(torch.int8), scb, weight.dtype)


def dequantize_int8(state: Int8State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight * SCB / 127 as an (out, in) tensor in `dtype` (default: the state's original dtype)."""
    return (state.weight.float() * (state.scb / 127.0).unsqueeze(1)).to(dtype or state.dtype)


def state_to_tensors(state: Int8State, prefix: str) -> dict[str, torch.Tensor]:
    """`prefix` is the module's name plus a dot, e.g. 'model.layers.0.mlp.down_proj.'."""
    return {f"{prefix}weight": state.weight, f"{prefix}SCB": state.scb,
            f"{prefix}weight_format": torch.tensor(0, dtype=torch.uint8)}  # 0 = "row", the only layout


def state_from_tensors(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, where: str,
                       weight_format=None) -> Int8State:
    """An Int8State from a checkpoint's `weight` (int8, (out, in)), `SCB` (one per row) and optional
    `weight_format`; `dtype` is what it dequantises to. Raises ModelLoadError naming `where` for another
    weight_format than 0 (row-major), a non-int8 weight or an SCB of the wrong shape."""
    from fasttune.errors import ModelLoadError

    if weight_format is not None and int(weight_format) != 0:
        raise ModelLoadError(f"{where}: int8 weight_format {int(weight_format)} is not supported (only row-major).")
    if weight.dtype != torch.int8 or scb.shape != weight.shape[:1]:
        raise ModelLoadError(f"{where}: expected an int8 weight with one SCB per row, got {weight.dtype} "
                             f"{tuple(weight.shape)} and SCB {tuple(scb.shape)}.")
    return Int8State(weight, scb.float(), dtype)
