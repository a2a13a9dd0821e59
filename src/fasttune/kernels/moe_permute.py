"""Moving MoE rows between token order and expert order ("permute" / "unpermute", Megatron's and Transformer
Engine's names), with backward passes that are gathers instead of scatters.

A token n routed to experts e_0..e_{k-1} is row n*k + j of the flattened pairs; `order` (N*k,) sorts those pairs by
expert (group_by_expert) and `pos` (N, k) is its inverse: pair (n, j) sits at row pos[n, j] of the
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

from typing import NamedTuple

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


class ExpertGroups(NamedTuple):
    """The (token, expert) pairs of a routing grouped by expert, as grouped GEMMs and permute/unpermute take them:
    order (N*k,) int64, the pairs sorted by expert, stably (pair n*k + j is token n's j-th choice); pos (N, k)
    int64, its inverse (pair (n, j) is sorted row pos[n, j]); rows (N*k,) int64 = order // k, the token of each
    sorted row; counts (E,) int32 rows per expert; offsets (E,) int32 their cumulative ends."""
    order: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def group_by_expert_reference(experts: torch.Tensor, num_experts: int) -> ExpertGroups:
    """group_by_expert in torch ops: a stable argsort, a histogram (histc: no device-to-host sync on CUDA, as
    transformers' grouped_mm experts do) and its cumulative sum, and the inverse permutation."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.float() if not flat.is_cuda else flat.int(), bins=num_experts, min=0,
                         max=num_experts - 1).to(torch.int32)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return ExpertGroups(order, pos.view(-1, k), torch.div(order, k, rounding_mode="floor"), counts,
                        torch.cumsum(counts, dim=0, dtype=torch.int32))


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
    def _expert_hist_kernel(experts_ptr, hist_ptr, S, SPLIT, BLOCK: tl.constexpr):
        """Program (e, c): hist[e, c] = #{s in chunk c : experts[s] == e}."""
        e = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        hit = tl.load(experts_ptr + offs, mask=offs < S, other=-1) == e
        tl.store(hist_ptr + e * SPLIT + c, tl.sum(hit.to(tl.int32), axis=0))

    @triton.jit
    def _expert_order_kernel(experts_ptr, hist_ptr, ends_ptr, counts_ptr, offsets_ptr, order_ptr, pos_ptr, rows_ptr,
                             S, SPLIT, K: tl.constexpr, BLOCK: tl.constexpr):
        """Program (e, c): expert e's pairs in chunk c, in pair order (a stable sort), take the rows after every
        pair of a smaller expert and of e's earlier chunks: ends is the inclusive prefix sum of hist (E, SPLIT)
        in expert-major order, so its (e, c) entry minus hist's is that start."""
        e = tl.program_id(0)
        c = tl.program_id(1)
        base = (tl.load(ends_ptr + e * SPLIT + c) - tl.load(hist_ptr + e * SPLIT + c)).to(tl.int64)
        if c == 0:
            end = tl.load(ends_ptr + e * SPLIT + SPLIT - 1)
            tl.store(offsets_ptr + e, end)
            tl.store(counts_ptr + e, end - base.to(tl.int32))
        offs = c * BLOCK + tl.arange(0, BLOCK)
        hit = tl.load(experts_ptr + offs, mask=offs < S, other=-1) == e
        m = hit.to(tl.int64)
        dest = base + tl.cumsum(m, axis=0) - m
        tl.store(order_ptr + dest, offs.to(tl.int64), mask=hit)
        tl.store(rows_ptr + dest, (offs // K).to(tl.int64), mask=hit)
        tl.store(pos_ptr + offs, dest, mask=hit)

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


def group_by_expert(experts: torch.Tensor, num_experts: int) -> ExpertGroups:
    """The pairs of a top-k routing grouped by expert (see ExpertGroups). experts (N, k) int64 in [0, E).
    Where use_triton(experts): a counting sort in chunks of 2048 pairs (per-expert counts of each chunk, their
    prefix sum, then each (expert, chunk) program places its pairs), equal to group_by_expert_reference's nine
    torch ops, with no device-to-host sync. Every program reads one chunk: E x chunks programs in parallel (a
    program per expert scanning every pair took ~120 us per Qwen3-30B-A3B layer)."""
    if not use_triton(experts) or experts.numel() == 0:
        return group_by_expert_reference(experts, num_experts)
    n, k = experts.shape
    flat = experts.reshape(-1).contiguous()
    s = flat.numel()
    block = min(next_pow2(s), 2048)
    split = triton.cdiv(s, block)
    hist = torch.empty(num_experts, split, dtype=torch.int32, device=flat.device)
    _expert_hist_kernel[(num_experts, split)](flat, hist, s, split, BLOCK=block)
    ends = hist.view(-1).cumsum(0, dtype=torch.int32)
    counts = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    offsets = torch.empty_like(counts)
    order, pos, rows = (torch.empty(s, dtype=torch.int64, device=flat.device) for _ in range(3))
    _expert_order_kernel[(num_experts, split)](flat, hist, ends, counts, offsets, order, pos, rows, s, split, K=k,
                                               BLOCK=block)
    return ExpertGroups(order, pos.view(n, k), rows, counts, offsets)


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
    """x.index_select(0, rows) whose backward sums each token's k rows by their positions `pos` (see permute)."""

    @staticmethod
    def forward(ctx, x, rows, pos):
        """x (N, H), rows (N*k,) int64 (each sorted row's token), pos (N, k) int64. Returns (N*k, H)."""
        ctx.save_for_backward(pos)
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, dxs):
        """dxs (N*k, H) -> (dx (N, H) = sum_j dxs[pos[n, j]], None, None)."""
        (pos,) = ctx.saved_tensors
        return gather_sum(dxs, pos), None, None


class _Unpermute(torch.autograd.Function):
    """The weighted gather-sum of unpermute on the Triton path; backward writes dout and dweights in one kernel."""

    @staticmethod
    def forward(ctx, out, pos, weights):
        """out (N*k, H) expert outputs, pos (N, k) int64, weights (N, k) float. Returns (N, H) in out's dtype."""
        ctx.save_for_backward(out, pos, weights)
        return gather_sum(out, pos, weights)

    @staticmethod
    def backward(ctx, dy):
        """dy (N, H) -> (dout (N*k, H) = w[n, j] dy[n] at pos[n, j], None, dweights (N, k) in weights' dtype)."""
        out, pos, weights = ctx.saved_tensors
        n, k = pos.shape
        dy = dy.contiguous()
        dout = torch.empty_like(out)
        dw = torch.empty(n, k, device=dy.device, dtype=torch.float32)
        block = min(next_pow2(out.shape[1]), _COLS)
        _unpermute_bwd_kernel[(n,)](dy, out, pos, weights.contiguous(), dout, dw, out.shape[1], K=k, BLOCK=block)
        return dout, None, dw.to(weights.dtype)


def permute(x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """The tokens in expert order: xs[s] = x[groups.rows[s]], differentiable in x (its backward is
    dx[n] = sum_j dxs[pos[n, j]], a gather; autograd of x[index] would be a sorting scatter-add).

    x (N, H); groups from group_by_expert. Returns (N*k, H) in x's dtype."""
    return _Permute.apply(x, groups.rows, groups.pos)


def unpermute(out: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's expert outputs, weighted and summed: y[n] = sum_j weights[n, j] * out[pos[n, j]].

    out (N*k, H) in expert order; pos (N, k) int64 = group_by_expert(...).pos; weights (N, k) float (the routing
    weights, differentiable). Returns (N, H) in out's dtype, differentiable in out and weights. The Triton path
    (use_triton(out)) adds in fp32 with the weights in their own precision and rounds once; the torch path is
    gather_sum_reference (the weights cast to out's dtype, one batched GEMM), through autograd."""
    if not use_triton(out):
        return gather_sum_reference(out, pos, weights)
    return _Unpermute.apply(out.contiguous(), pos.contiguous(), weights)
