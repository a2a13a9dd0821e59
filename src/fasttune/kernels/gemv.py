"""Matrix-vector products for one-token decode steps: y_i = x W_i^T (+ b_i) for a single row x and up to three
weights in one launch (q/k/v).

At batch 1 a decode step is a chain of matrix-vector products, bound by reading the weights, and the small ones
(a 1B model's k/v: 2 MB) by kernel latency: one launch per projection spends more on starting kernels than on
bytes. Here each program reads a BLOCK_N x K stripe of one weight in BLOCK_K chunks and sums in fp32, and one
launch covers up to three weights (their programs side by side). Measured on an H200 inside CUDA graphs, q/k/v
of a Llama-3.2-1B layer take 6.6 us in one launch against 15.0 us for cuBLAS's three (Llama-3.1-8B: 20.5 vs
25.1), while for one large weight cuBLAS stays faster (8B down_proj 32 vs 67 us), so `one_row_linears` takes this
kernel only for groups holding a small weight. The reference (`gemv_reference`) is torch's linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels.dispatch import HAVE_TRITON


def gemv_reference(x: torch.Tensor, weights, biases) -> tuple[torch.Tensor, ...]:
    """(F.linear(x, w, b) for each weight): x (..., K) holding one row, weights (N_i, K), biases (N_i,) or None."""
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _stripe(x_ptr, w_ptr, rows, rmask, K, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """sum_k x[k] w[rows, k] in fp32 for one stripe of rows."""
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            xv = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        return acc

    @triton.jit
    def _gemv3(x_ptr, w0, w1, w2, b0, b1, b2, y0, y1, y2, n0, n1, n2, K, blocks0, blocks1,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        # Programs [0, blocks0) compute weight 0, the next blocks1 weight 1, the rest weight 2.
        if pid < blocks0:
            w, b, y, n, blk = w0, b0, y0, n0, pid
        elif pid < blocks0 + blocks1:
            w, b, y, n, blk = w1, b1, y1, n1, pid - blocks0
        else:
            w, b, y, n, blk = w2, b2, y2, n2, pid - blocks0 - blocks1
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        acc = _stripe(x_ptr, w, rows, rmask, K, BLOCK_K, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(b + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y + rows, acc.to(y.dtype.element_ty), mask=rmask)


def _blocks(k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): stripes of 16 rows read in 512-column chunks (16 KB of bf16 per step)."""
    return 16, min(512, triton.next_power_of_2(k)), 4


def gemv(x: torch.Tensor, weights, biases) -> tuple[torch.Tensor, ...]:
    """One launch computing F.linear(x, w_i, b_i) for up to three weights.

    x (..., K) with exactly one row (x.numel() == K), contiguous; weights: 1-3 contiguous (N_i, K) tensors of x's
    dtype; biases: matching (N_i,) tensors or None (all or none). Returns one (..., N_i) tensor per weight in x's
    dtype, accumulated in fp32. Raises ValueError for more than three weights or a shape that does not fit."""
    k = x.shape[-1]
    if not 1 <= len(weights) <= 3 or x.numel() != k or any(w.shape[1] != k for w in weights):
        raise ValueError("gemv takes one row and one to three (N, K) weights")
    has_bias = biases[0] is not None
    outs = [torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device) for w in weights]
    block_n, block_k, warps = _blocks(k)
    counts = [triton.cdiv(w.shape[0], block_n) for w in weights]
    pad = lambda seq: list(seq) + [seq[-1]] * (3 - len(seq))  # noqa: E731 - unused slots repeat the last weight
    ws, bs, ys = pad(list(weights)), pad(list(biases) if has_bias else list(weights)), pad(outs)
    ns = pad([w.shape[0] for w in weights])
    _gemv3[(sum(counts),)](x, *ws, *bs, *ys, *ns, k, counts[0], counts[1] if len(counts) > 1 else 0,
                           HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return tuple(outs)


SMALL_WEIGHT_BYTES = 16 << 20  # a group holding a weight this small is bound by launches, not bytes


def one_row_linears(x: torch.Tensor, layers) -> bool:
    """Whether `gemv` computes layer(x) for these layers, and is the faster way: Triton on (see
    dispatch.use_triton), no autograd, x one contiguous row, two or three plain nn.Linear layers (not LoRA, not
    quantised) of x's dtype over the same K with contiguous weights, all or none with biases, and at least one
    weight under SMALL_WEIGHT_BYTES (q/k/v; not gate/up, where cuBLAS's two launches are faster)."""
    from fasttune.kernels.dispatch import use_triton

    if torch.is_grad_enabled() or not use_triton(x) or not 2 <= len(layers) <= 3:
        return False
    if x.numel() != x.shape[-1] or not x.is_contiguous():
        return False
    if any(type(m) is not torch.nn.Linear for m in layers):
        return False
    weights = [m.weight for m in layers]
    if any(w.dtype != x.dtype or w.shape[1] != x.shape[-1] or not w.is_contiguous() for w in weights):
        return False
    if min(w.numel() * w.element_size() for w in weights) > SMALL_WEIGHT_BYTES:
        return False
    return len({m.bias is None for m in layers}) == 1
