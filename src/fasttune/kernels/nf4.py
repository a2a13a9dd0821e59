"""NF4 dequantisation (bitsandbytes layout, see quant/nf4.py): one launch unpacks the nibbles, undoes the double
quantisation of the block absmax and writes the weight in the compute dtype.

The reference is `quant.nf4.dequantize_nf4_reference`; both compute level * absmax in fp32 with the same roundings
(no fused multiply-add), so they agree bit for bit.
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
                     ROWS: tl.constexpr):
        # Each program writes ROWS quantisation blocks as a (ROWS, BLOCKSIZE) tile: the packed bytes are read once
        # as (ROWS, BLOCKSIZE / 2), each byte gives two weights (high nibble first, bitsandbytes' order) that are
        # interleaved back into place, and the absmax is one load per block. (A program per 1,024 weights with
        # per-weight byte and absmax loads ran at ~2.7 TB/s on an H200.)
        half: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        first = rows[:, None] * BLOCKSIZE + 2 * tl.arange(0, half)[None, :]  # element index of each high nibble
        byte = tl.load(packed_ptr + first // 2, mask=first < n, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        block_mask = rows * BLOCKSIZE < n
        if NESTED:
            q = tl.load(absmax_ptr + rows, mask=block_mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * \
                tl.load(nested_absmax_ptr + rows // NESTED_BLOCKSIZE, mask=block_mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + rows, mask=block_mask, other=0.0)
        values = tl.interleave(hi * scale[:, None], lo * scale[:, None])  # (ROWS, BLOCKSIZE)
        offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < n)


# Weights each program writes, and its warps (None: Triton's default, 4), for small and large weights.
# bench/bench_lora_gemm.py --dequant-sweep on one H200 (bench/results/lora_gemm.jsonl, session 42): an 8B gate/up
# projection (58.7M weights) took 58.8 us with 4,096 weights and 4 warps a program and 50.4 us with 1,024 and 2
# (2.5 -> 2.9 TB/s); a 4096 x 4096 one was fastest near the defaults (24.5 us; 26.7 with 1,024 and 2).
WEIGHTS_PER_PROGRAM = 4096
NUM_WARPS = None
LARGE_WEIGHT = 1 << 25  # weights from which the large tiling below is taken
LARGE_WEIGHTS_PER_PROGRAM, LARGE_NUM_WARPS = 1024, 2


def dequantize_nf4(state: NF4State, dtype: torch.dtype, weights_per_program: int | None = None,
                   num_warps: int | None = None) -> torch.Tensor:
    """The weight of `state` as a dense `dtype` tensor of state.shape. weights_per_program / num_warps: the launch's
    tiling (default WEIGHTS_PER_PROGRAM / NUM_WARPS, or the LARGE_ ones from LARGE_WEIGHT weights; the result is the
    same)."""
    if not use_triton(state.packed):
        return dequantize_nf4_reference(state, dtype)
    n = 1
    for s in state.shape:
        n *= s
    bs = state.blocksize
    if bs & (bs - 1):  # bitsandbytes' block sizes are powers of two; another one takes the torch path
        return dequantize_nf4_reference(state, dtype)
    out = torch.empty(state.shape, dtype=dtype, device=state.packed.device)
    large = n >= LARGE_WEIGHT
    rows = max(1, (weights_per_program or (LARGE_WEIGHTS_PER_PROGRAM if large else WEIGHTS_PER_PROGRAM)) // bs)
    warps = num_warps or (LARGE_NUM_WARPS if large else NUM_WARPS)
    nested = state.nested
    absmax = state.absmax if nested else state.absmax.float()
    # Unused pointers (no double quantisation) still need a tensor; absmax stands in.
    _dequant_nf4[(triton.cdiv(triton.cdiv(n, bs), rows),)](
        state.packed, absmax, state.code, state.nested_absmax if nested else absmax,
        state.nested_code if nested else absmax, out, n, state.offset,
        BLOCKSIZE=bs, NESTED_BLOCKSIZE=state.nested_blocksize, NESTED=nested, ROWS=rows,
        **({"num_warps": warps} if warps else {}),
        # No fused multiply-add: the nested scale is code * absmax rounded, then + offset rounded, as in
        # bitsandbytes and the reference; an FMA moves the fp32 scale's last bit and, at bf16 ties, the weight.
        enable_fp_fusion=False)
    return out
