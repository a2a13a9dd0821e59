"""Moving MoE rows between token order and expert order ("permute" / "unpermute", Megatron's and Transformer
Engine's names), with backward passes that are gathers instead of scatters.

A token n routed to experts e_0..e_{k-1} is row n*k + j of the flattened pairs; `order` (N*k,) sorts those pairs by
expert (models/moe.py's sort_by_expert) and `pos` (N, k) is its inverse: pair (n, j) sits at row pos[n, j] of the
expert-sorted rows. Then

    permute:   xs[s] = x[order[s] // k]                         (the tokens copied into expert order)
    unpermute: y[n]  = sum_j w[n, j] * out[pos[n, j]]            (each token's k expert outputs, weighted)

Autograd of the plain torch ops makes both slow on the GPU: x[order // k] backpropagates through a sorting
index_put with accumulation, and the weighting as a (1, k) x (k, H) batched GEMM per token runs at a few percent of
the card. Here the permute's backward is dx[n] = sum_j dxs[pos[n, j]], the unpermute's forward is the same
gather-and-sum with weights, and the unpermute's backward writes dout[pos[n, j]] = w[n, j] dy[n] and
dw[n, j] = <dy[n], out[pos[n, j]]> in one pass. Every row is written by exactly one program: no atomics, and the
result is deterministic. The Triton kernels add in fp32 and round once; the torch references are what runs on a
CPU and under FASTTUNE_KERNELS=torch.
"""
from __future__ import annotations

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


def inverse_order(order: torch.Tensor, k: int) -> torch.Tensor:
    """pos (N, k) int64 with pos.view(-1)[order[s]] = s: where pair (n, j) sits among the expert-sorted rows.
    order: (N*k,) int64, a permutation of 0..N*k-1."""
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos.view(-1, k)


def gather_sum_reference(src: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """y[n] = sum_j w[n, j] * src[pos[n, j]] (w = 1 when weights is None) in torch: src (S, H), pos (N, k) int64,
    weights (N, k) any float dtype. Returns (N, H) in src's dtype. With weights it is the batched GEMM the MoE
    block always used (the weights cast to src's dtype), so the torch path keeps its numbers."""
    rows = src[pos]  # (N, k, H)
    if weights is None:
        return rows.sum(dim=1)
    return torch.bmm(weights.to(src.dtype).unsqueeze(1), rows).squeeze(1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_sum_kernel(src_ptr, pos_ptr, w_ptr, y_ptr, H, K: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        """One token's block of columns: y[n, cols] = sum_j w[n, j] * src[pos[n, j], cols], in fp32."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + n * K + j)
            v = tl.load(src_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + n * K + j).to(tl.float32)
            acc += v
        tl.store(y_ptr + n * H + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _unpermute_bwd_kernel(dy_ptr, out_ptr, pos_ptr, w_ptr, dout_ptr, dw_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
        """One token: dout[pos[n, j]] = w[n, j] * dy[n] and dw[n, j] = <dy[n], out[pos[n, j]]> (fp32) for each j."""
        n = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + n * K + j)
            w = tl.load(w_ptr + n * K + j).to(tl.float32)
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, H, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < H
                dy = tl.load(dy_ptr + n * H + cols, mask=mask, other=0.0).to(tl.float32)
                o = tl.load(out_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dout_ptr + row * H + cols, (w * dy).to(dout_ptr.dtype.element_ty), mask=mask)
                dot += dy * o
            tl.store(dw_ptr + n * K + j, tl.sum(dot, axis=0))


_COLS = 1024  # columns per program of the gather-sum: H up to 1024 in one program, else column blocks


def gather_sum(src: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """gather_sum_reference's result (not differentiable), by the Triton kernel where use_triton(src), else by
    the reference. src (S, H); pos (N, k) int64; weights (N, k) float or None. Returns (N, H) in src's dtype."""
    if not use_triton(src):
        return gather_sum_reference(src, pos, weights)
    src, pos = src.contiguous(), pos.contiguous()
    n, k = pos.shape
    h = src.shape[1]
    y = src.new_empty(n, h)
    block = min(next_pow2(h), _COLS)
    w = pos if weights is None else weights.contiguous()  # unread without weights
    _gather_sum_kernel[(n, triton.cdiv(h, block))](src, pos, w, y, h, K=k, HAS_W=weights is not None, BLOCK=block)
    return y


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, pos):
        ctx.save_for_backward(pos)
        return x.index_select(0, torch.div(order, pos.shape[1], rounding_mode="floor"))

    @staticmethod
    def backward(ctx, dxs):
        (pos,) = ctx.saved_tensors
        return gather_sum(dxs, pos), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, pos, weights):
        ctx.save_for_backward(out, pos, weights)
        return gather_sum(out, pos, weights)

    @staticmethod
    def backward(ctx, dy):
        out, pos, weights = ctx.saved_tensors
        n, k = pos.shape
        dy = dy.contiguous()
        dout = torch.empty_like(out)
        dw = torch.empty(n, k, device=dy.device, dtype=torch.float32)
        block = min(next_pow2(out.shape[1]), _COLS)
        _unpermute_bwd_kernel[(n,)](dy, out, pos, weights.contiguous(), dout, dw, out.shape[1], K=k, BLOCK=block)
        return dout, None, dw.to(weights.dtype)


def permute(x: torch.Tensor, order: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The tokens in expert order: xs[s] = x[order[s] // k], differentiable in x (its backward is
    dx[n] = sum_j dxs[pos[n, j]], a gather; autograd of x[index] would be a sorting scatter-add).

    x (N, H); order (N*k,) int64 from sort_by_expert; pos (N, k) = inverse_order(order, k). Returns (N*k, H)."""
    return _Permute.apply(x, order, pos)


def unpermute(out: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's expert outputs, weighted and summed: y[n] = sum_j weights[n, j] * out[pos[n, j]].

    out (N*k, H) in expert order; pos (N, k) int64 = inverse_order(order, k); weights (N, k) float (the routing
    weights, differentiable). Returns (N, H) in out's dtype, differentiable in out and weights. The Triton path
    (use_triton(out)) adds in fp32 with the weights in their own precision and rounds once; the torch path is
    gather_sum_reference (the weights cast to out's dtype, one batched GEMM), through autograd."""
    if not use_triton(out):
        return gather_sum_reference(out, pos, weights)
    return _Unpermute.apply(out.contiguous(), pos.contiguous(), weights)
