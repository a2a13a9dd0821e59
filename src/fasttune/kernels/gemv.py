"""Matrix-vector products for one-token decode steps: y_i = x W_i^T (+ b_i) for a single row x and up to three
weights in one launch (q/k/v), and the gated MLP's act(x Wg^T) * (x Wu^T) in one launch.

At batch 1 a decode step is a chain of matrix-vector products, bound by reading the weights from HBM, and the small
ones by kernel latency. Here each program reads a BLOCK_N x K stripe of a weight in BLOCK_K chunks into an fp32
(BLOCK_N, BLOCK_K) accumulator and reduces it once at the end; stripes of two rows give the card thousands of
programs, enough loads in flight to draw its bandwidth. Measured on an H200 inside CUDA graphs with the weights
cycled through more memory than the 50 MB L2 holds (as a decode step reads them), against cuBLAS's F.linear:
Llama-3.2-1B q/k/v fused 4.9 us vs 6.4 (one concatenated weight), o_proj 4.0 vs 6.0, gate 10.0 vs 10.7, down
10.1 vs 13.9; Llama-3.1-8B o_proj 10.2 vs 13.2, down 29.4 vs 31.4. The reference (`gemv_reference`) is torch's
linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels.activations import ACT_IDS, gated_act_reference
from fasttune.kernels.dispatch import HAVE_TRITON, use_triton


def gemv_reference(x: torch.Tensor, weights, biases) -> tuple[torch.Tensor, ...]:
    """(F.linear(x, w, b) for each weight): x (..., K) holding one row, weights (N_i, K), biases (N_i,) or None."""
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from fasttune.kernels.activations import act_and_grad

    @triton.jit
    def _stripe(x_ptr, w_ptr, rows, rmask, K, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """sum_k x[k] w[rows, k] in fp32 for one stripe of rows."""
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            xv = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += wv * xv[None, :]
        return tl.sum(acc, axis=1)

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


    @triton.jit
    def _gated_gemv(x_ptr, wg, wu, bg, bu, y_ptr, N, K, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        g = _stripe(x_ptr, wg, rows, rmask, K, BLOCK_K, BLOCK_N)
        u = _stripe(x_ptr, wu, rows, rmask, K, BLOCK_K, BLOCK_N)
        if HAS_BIAS:
            g += tl.load(bg + rows, mask=rmask, other=0.0).to(tl.float32)
            u += tl.load(bu + rows, mask=rmask, other=0.0).to(tl.float32)
        # rounded as the two projections' outputs are on the unfused path, then act(gate) * up as gated_act does
        g = g.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
        a, _ = act_and_grad(g, ACT)
        tl.store(y_ptr + rows, (a * u).to(y_ptr.dtype.element_ty), mask=rmask)


def _blocks(k: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): stripes of two rows read in chunks of up to 1024 columns, four warps (the
    fastest of 45 settings for every shape above). Triton's CPU interpreter runs programs one after another, so
    there stripes are 32 rows (the sums are the same up to fp32 rounding order)."""
    return 2 if device.type == "cuda" else 32, min(1024, triton.next_power_of_2(k)), 4


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
    block_n, block_k, warps = _blocks(k, x.device)
    counts = [triton.cdiv(w.shape[0], block_n) for w in weights]
    pad = lambda seq: list(seq) + [seq[-1]] * (3 - len(seq))  # noqa: E731 - unused slots repeat the last weight
    ws, bs, ys = pad(list(weights)), pad(list(biases) if has_bias else list(weights)), pad(outs)
    ns = pad([w.shape[0] for w in weights])
    _gemv3[(sum(counts),)](x, *ws, *bs, *ys, *ns, k, counts[0], counts[1] if len(counts) > 1 else 0,
                           HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return tuple(outs)


def gated_gemv(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate, b_up, act: str) -> torch.Tensor:
    """act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up) in one launch (the gated MLP's first half).

    x (..., K) with one row, contiguous; w_gate/w_up contiguous (N, K) of x's dtype; b_gate/b_up (N,) or None
    (both or neither); act as kernels/activations.gated_act names it. Each projection is rounded to x's dtype
    before the activation, as on the unfused path. Returns (..., N) in x's dtype. Raises ValueError for an
    unsupported act or shapes that do not fit."""
    k = x.shape[-1]
    if act not in ACT_IDS:
        raise ValueError(f"unsupported activation {act}")
    if x.numel() != k or w_gate.shape != w_up.shape or w_gate.shape[1] != k:
        raise ValueError("gated_gemv takes one row and two (N, K) weights of the same shape")
    n = w_gate.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = _blocks(k, x.device)
    has_bias = b_gate is not None
    _gated_gemv[(triton.cdiv(n, block_n),)](x, w_gate, w_up, b_gate if has_bias else w_gate,
                                            b_up if has_bias else w_up, y, n, k, HAS_BIAS=has_bias,
                                            ACT=ACT_IDS[act], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def gated_gemv_reference(x, w_gate, w_up, b_gate, b_up, act: str) -> torch.Tensor:
    """The unfused `gated_gemv`: two F.linear and gated_act_reference."""
    return gated_act_reference(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), act)


def one_row_linears(x: torch.Tensor, layers) -> bool:
    """Whether `gemv` (or, for a gate/up pair, `gated_gemv`) computes layer(x) for these layers: Triton on (see
    dispatch.use_triton), no autograd, x one contiguous row, one to three plain nn.Linear layers (not LoRA, not
    quantised) of x's dtype over the same K with contiguous weights, all or none with biases."""
    if torch.is_grad_enabled() or not use_triton(x) or not 1 <= len(layers) <= 3:
        return False
    if x.numel() != x.shape[-1] or not x.is_contiguous():
        return False
    if any(type(m) is not torch.nn.Linear for m in layers):
        return False
    weights = [m.weight for m in layers]
    if any(w.dtype != x.dtype or w.shape[1] != x.shape[-1] or not w.is_contiguous() for w in weights):
        return False
    return len({m.bias is None for m in layers}) == 1
