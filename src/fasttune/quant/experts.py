"""Stacked MoE expert weights stored in NF4 (QLoRA on mixture-of-experts models) or FP8.

A `QuantExpertWeight` takes the place of `Experts.gate_up_proj` / `down_proj` (E, out, in) when a MoE model is
loaded with `load_in_4bit`: the whole stack is quantised as one tensor (bitsandbytes' NF4 layout, blocks of 64
along the flattened weight, double-quantised absmax; quant/nf4.py), 0.53 bytes a weight instead of 2. With
`load_in_fp8` each stored row (the stack's last dimension) is float8_e4m3fn with one fp32 scale (quant/fp8_rows.py's
rounding), 1 byte a weight; the experts multiply in 16 bits (weight-only FP8: their activations are not quantised,
unlike the FP8 dense layers, since the grouped GEMM has no FP8 form here).
models/moe.py's `expert_linear` runs the grouped GEMM on it: forward and backward each dequantise the stack into
a temporary (one layer's experts at a time) and nothing weight-sized is saved for backward, as QuantLinear does for
dense layers (autograd of a plain dequantise + grouped GEMM would keep every layer's 16-bit experts).
The weights are frozen; LoRA on them (peft/lora.py's ExpertLora) adds its own grouped GEMMs beside.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.kernels.fp8 import FP8, quantize_rows_reference
from fasttune.quant import nf4
from fasttune.quant.linear import hold_nf4, move_storage

_FP8_CHUNK_ELEMENTS = 1 << 26  # weights (de)quantised at once: a 256 MB fp32 temporary at most, few launches


def _experts_a_chunk(shape) -> int:
    """How many experts of an (E, out, in) stack _FP8_CHUNK_ELEMENTS holds (at least one)."""
    return max(1, _FP8_CHUNK_ELEMENTS // max(1, shape[-1] * shape[-2]))


class QuantExpertWeight(nn.Module):
    """A frozen stacked expert weight (E, out, in) held as NF4 buffers, or FP8 values and row scales.

    Args: state (an NF4State of the (E, out, in) weight, or a (float8 values, fp32 scales of shape[:-1]) pair),
    compute_dtype (what `dequantized()` gives by default). `shape` / `dtype` / `device` describe the dense weight it
    stands for, so code that reads a stacked parameter's shape (experts_forward, ExpertLora) works unchanged."""

    def __init__(self, state, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype
        if isinstance(state, tuple):  # FP8
            self.quant_type, self.orig_dtype = "fp8", compute_dtype
            self.shape = torch.Size(state[0].shape)
            self.register_buffer("qweight", state[0])
            self.register_buffer("scale", state[1])
        else:
            self.quant_type, self.orig_dtype = "nf4", state.dtype
            self.shape = torch.Size(state.shape)
            hold_nf4(self, state)

    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str = "nf4") -> "QuantExpertWeight":
        """`weight` (E, out, in) quantised to NF4 ("nf4") or FP8 with row scales ("fp8") on its device, computing in
        its dtype."""
        if quant_type == "fp8":
            q = torch.empty(weight.shape, dtype=FP8, device=weight.device)
            s = torch.empty(weight.shape[:-1], dtype=torch.float32, device=weight.device)
            step = _experts_a_chunk(weight.shape)
            for i in range(0, weight.shape[0], step):  # a few experts' fp32 copy at a time
                part = weight[i:i + step]
                qi, si = quantize_rows_reference(part.reshape(-1, part.shape[-1]))
                q[i:i + step], s[i:i + step] = qi.view(part.shape), si.view(part.shape[:-1])
            return cls((q, s), weight.dtype)
        return cls(nf4.quantize_nf4(weight), weight.dtype)

    @property
    def state(self) -> nf4.NF4State:
        """The NF4 buffers as an NF4State (the same tensors, not copies)."""
        return nf4.NF4State(self.packed, self.absmax, tuple(self.shape), self.orig_dtype, self.blocksize,
                            self.nested_absmax, self.nested_code, self.nested_blocksize, self.offset, self.code)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what a 16-bit stacked parameter's dtype would be)."""
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        """The device of the quantised storage."""
        return (self.qweight if self.quant_type == "fp8" else self.packed).device

    @property
    def first_buffer(self) -> str:
        """The name of the storage's first buffer (state_dict readers emit the stack once, under it)."""
        return "qweight" if self.quant_type == "fp8" else "packed"

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (E, out, in) weight as a new dense tensor in `dtype` (default: the compute dtype); FP8: each value
        times its row's scale in fp32, a few experts at a time."""
        dtype = dtype or self.compute_dtype
        if self.quant_type == "fp8":
            out = torch.empty(self.shape, dtype=dtype, device=self.qweight.device)
            step = _experts_a_chunk(self.shape)
            for i in range(0, self.shape[0], step):
                out[i:i + step] = (self.qweight[i:i + step].float() * self.scale[i:i + step].unsqueeze(-1)).to(dtype)
            return out
        from fasttune.kernels.nf4 import dequantize_nf4

        return dequantize_nf4(self.state, dtype)

    def nbytes(self) -> int:
        """Bytes of the quantised storage."""
        if self.quant_type == "fp8":
            return self.qweight.numel() + self.scale.numel() * 4
        return self.state.nbytes()

    def _apply(self, fn, recurse=True):
        move_storage(self, super()._apply, fn, recurse)  # model.to(dtype) moves the storage, never casts it
        return self

    def extra_repr(self) -> str:
        """Shown in print(model): the stacked shape and quant_type."""
        return f"shape={tuple(self.shape)}, quant_type={self.quant_type}"
