"""NF4 dequantisation (bitsandbytes layout, see quant/nf4.py): one launch unpacks the nibbles, undoes the double
quantisation of the block absmax and writes the weight in the compute dtype.

The reference is `quant.nf4.dequantize_nf4_reference`; both compute level * absmax in fp32 and round once.
"""
from __future__ import annotations

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, use_triton
from fasttune.quant.nf4 import NF4State, dequantize_nf4_reference

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequant_nf4(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n, offset,
                     BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                     BLOCK: tl.constexpr):
        # Each program writes BLOCK weights = BLOCK // 2 packed bytes; BLOCK is a multiple of BLOCKSIZE only by
        # choice of the caller, so the absmax is looked up per element (the loads hit the same cache line).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        blk = offs // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * \
                tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (level * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nf4(state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """The weight of `state` as a dense `dtype` tensor of state.shape."""
    if not use_triton(state.packed):
        return dequantize_nf4_reference(state, dtype)
    n = 1
    for s in state.shape:
        n *= s
    out = torch.empty(state.shape, dtype=dtype, device=state.packed.device)
    block = 1024
    nested = state.nested
    absmax = state.absmax if nested else state.absmax.float()
    # Unused pointers (no double quantisation) still need a tensor; absmax stands in.
    _dequant_nf4[(triton.cdiv(n, block),)](
        state.packed, absmax, state.code, state.nested_absmax if nested else absmax,
        state.nested_code if nested else absmax, out, n, state.offset,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize, NESTED=nested, BLOCK=block)
    return out
