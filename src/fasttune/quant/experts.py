"""Stacked MoE expert weights stored in NF4 (QLoRA on mixture-of-experts models).

A `QuantExpertWeight` takes the place of `Experts.gate_up_proj` / `down_proj` (E, out, in) when a MoE model is
loaded with `load_in_4bit`: the whole stack is quantised as one tensor (bitsandbytes' NF4 layout, blocks of 64
along the flattened weight, double-quantised absmax; quant/nf4.py), 0.53 bytes a weight instead of 2.
models/moe.py's `expert_linear` runs the grouped GEMM on it: forward and backward each dequantise the stack into
a temporary (one layer's experts at a time) and nothing weight-sized is saved for backward, as QuantLinear does for
dense layers (autograd of a plain dequantise + grouped GEMM would keep every layer's 16-bit experts).
The weights are frozen; LoRA on them (peft/lora.py's ExpertLora) adds its own grouped GEMMs beside.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.quant import nf4
from fasttune.quant.linear import hold_nf4, move_storage


class QuantExpertWeight(nn.Module):
    """A frozen stacked expert weight (E, out, in) held as NF4 buffers.

    Args: state (an NF4State of the (E, out, in) weight), compute_dtype (what `dequantized()` gives by default).
    `shape` / `dtype` / `device` describe the dense weight it stands for, so code that reads a stacked
    parameter's shape (experts_forward, ExpertLora) works unchanged."""

    def __init__(self, state: nf4.NF4State, compute_dtype: torch.dtype):
        super().__init__()
        self.shape = torch.Size(state.shape)
        self.compute_dtype, self.orig_dtype = compute_dtype, state.dtype
        hold_nf4(self, state)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "QuantExpertWeight":
        """`weight` (E, out, in) quantised to NF4 on its device, computing in its dtype."""
        return cls(nf4.quantize_nf4(weight), weight.dtype)

    @property
    def state(self) -> nf4.NF4State:
        """The buffers as an NF4State (the same tensors, not copies)."""
        return nf4.NF4State(self.packed, self.absmax, tuple(self.shape), self.orig_dtype, self.blocksize,
                            self.nested_absmax, self.nested_code, self.nested_blocksize, self.offset, self.code)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what a 16-bit stacked parameter's dtype would be)."""
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        """The device of the NF4 storage."""
        return self.packed.device

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (E, out, in) weight as a new dense tensor in `dtype` (default: the compute dtype)."""
        from fasttune.kernels.nf4 import dequantize_nf4

        return dequantize_nf4(self.state, dtype or self.compute_dtype)

    def nbytes(self) -> int:
        """Bytes of the quantised storage."""
        return self.state.nbytes()

    def _apply(self, fn, recurse=True):
        move_storage(self, super()._apply, fn, recurse)  # model.to(dtype) moves the NF4 storage, never casts it
        return self

    def extra_repr(self) -> str:
        """Shown in print(model): the stacked shape and quant_type."""
        return f"shape={tuple(self.shape)}, quant_type=nf4"
