"""The experts' LoRA on expert-sorted rows, in three Triton kernels, and the autograd Function that uses them.

An MoE layer's expert LoRA multiplies the expert-sorted rows by thin per-expert factors: xs (S, K) @ a_e (K, r) and
low (S, r) @ b_e (r, N), added to the frozen base product xs @ W_e. torch's grouped GEMM kernel runs the thin
products poorly (a profile of Qwen3-30B-A3B with expert LoRA, rank 16: ~135 us for each (S, K) @ (K, 16), where one
pass over xs needs ~35 us, four per layer; ~50 us for each (S, 16) @ (16, N) plus ~50 us for adding it to the base
output or input gradient). So:

- `grouped_thin_mm`: y (S, r) = x @ w_e for each row's expert. A program per tile of rows walks the experts that
  own rows of its tile; masked loads read every row of x once.
- `grouped_expand_add_`: out (S, N) += scale * low @ w_e (+ bias_e), in place: the rank-r product is added into the
  base output (or the base input gradient) without being written out first.
- `grouped_weight_grad`: dw[e] = x_e^T @ dy_e, a program per expert and output tile walking that expert's rows.

`expert_lora_linear` is y = base(x) + scale * (x @ a_e) @ b_e (+ bias_e) for a frozen base, with dx accumulated
into the base's input gradient in place. Each kernel has a torch reference (`*_reference`, loops over experts) that
runs on a CPU and under FASTTUNE_KERNELS=torch. All sum in fp32.
"""
from __future__ import annotations

import torch

from fasttune.kernels import rebuild
from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


def grouped_weight_grad_reference(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor,
                                  out: torch.Tensor) -> torch.Tensor:
    """out[e] = x[s_e:e_e]^T @ dy[s_e:e_e] per expert e (rows s_e..e_e from the cumulative `offsets`), in fp32, then
    written into `out` (E, P, Q) in its dtype. x (S, P), dy (S, Q). Returns out."""
    ends = offsets.tolist()
    start = 0
    for e, end in enumerate(ends):
        out[e] = (x[start:end].float().t() @ dy[start:end].float()).to(out.dtype)
        start = end
    return out


def _tile_rows_reference(offsets: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty group from the cumulative row ends `offsets`, clipped to `rows`."""
    groups, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        end = min(end, rows)
        if end > start:
            groups.append((e, start, end))
        start = max(start, end)
    return groups


def grouped_thin_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[s] = x[s] @ w[e(s)] in fp32, returned in x's dtype: x (S, K), w (E, K, R). Rows past offsets[-1] are 0."""
    out = torch.zeros(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype)
    for e, start, end in _tile_rows_reference(offsets, x.shape[0]):
        out[start:end] = (x[start:end].float() @ w[e].float()).to(x.dtype)
    return out


def grouped_expand_add_reference(out: torch.Tensor, low: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                                 scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] += scale * low[s] @ w[e(s)] (+ bias[e(s)]) in place, summed in fp32: out (S, N), low (S, R),
    w (E, R, N), bias (E, N) or None. Returns out."""
    for e, start, end in _tile_rows_reference(offsets, out.shape[0]):
        add = scale * (low[start:end].float() @ w[e].float())
        if bias is not None:
            add = add + bias[e].float()
        out[start:end] = (out[start:end].float() + add).to(out.dtype)
    return out


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b summed in fp32; IEEE: full fp32 products (fp32 inputs; the default would round them to tf32)."""
        if IEEE:
            out = tl.dot(a, b, input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _group_span(offsets_ptr, e):
        """Expert e's rows [start, end)."""
        return tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0), tl.load(offsets_ptr + e)

    @triton.jit
    def _grouped_weight_grad_kernel(x_ptr, dy_ptr, offsets_ptr, out_ptr, P, Q, stride_x, stride_dy,
                                    stride_oe, stride_op, stride_oq, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                                    BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
        """Program (e, p-tile, q-tile): sum over expert e's rows of x[s, p] * dy[s, q], fp32."""
        e = tl.program_id(0)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        start, end = _group_span(offsets_ptr, e)
        start, end = start.to(tl.int64), end.to(tl.int64)
        acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            live = rows < end
            xt = tl.load(x_ptr + rows[None, :] * stride_x + offs_p[:, None],
                         mask=live[None, :] & (offs_p[:, None] < P), other=0.0)  # (BLOCK_P, BLOCK_S)
            g = tl.load(dy_ptr + rows[:, None] * stride_dy + offs_q[None, :],
                        mask=live[:, None] & (offs_q[None, :] < Q), other=0.0)  # (BLOCK_S, BLOCK_Q)
            acc += _dot(xt, g, IEEE)
        tl.store(out_ptr + e * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q))

    @triton.jit
    def _tile_experts(offsets_ptr, E, row0, row_end, BLOCK_E: tl.constexpr):
        """First and last expert owning a row of [row0, row_end): row s belongs to the number of ends <= s."""
        idx = tl.arange(0, BLOCK_E)
        ends = tl.load(offsets_ptr + idx, mask=idx < E, other=2147483647)
        first = tl.sum((ends <= row0).to(tl.int32))
        last = tl.minimum(tl.sum((ends <= row_end - 1).to(tl.int32)), E - 1)
        return first, last

    @triton.jit
    def _thin_mm_kernel(x_ptr, w_ptr, offsets_ptr, out_ptr, S, K, R, E, stride_x, stride_we, stride_wk, stride_wr,
                        stride_o, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_E: tl.constexpr, IEEE: tl.constexpr):
        """Program (row tile, r tile): out[s, r] = sum_k x[s, k] w[e(s), k, r], fp32, for the tile's experts."""
        row0 = tl.program_id(0) * BLOCK_S
        rows = row0 + tl.arange(0, BLOCK_S)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        first, last = _tile_experts(offsets_ptr, E, row0, tl.minimum(row0 + BLOCK_S, S), BLOCK_E)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        acc = tl.zeros([BLOCK_S, BLOCK_R], dtype=tl.float32)
        for e in range(first, last + 1):
            start, end = _group_span(offsets_ptr, e)
            if start < end:  # empty experts between two groups cost nothing (deep layers leave many unused)
                live = ((rows >= start) & (rows < end))[:, None]  # rows of other experts are not read
                w_e = w_ptr + e * stride_we + offs_r[None, :] * stride_wr
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    xt = tl.load(x_rows + ks[None, :], mask=live & (ks[None, :] < K), other=0.0)
                    wt = tl.load(w_e + ks[:, None] * stride_wk, mask=(ks[:, None] < K) & (offs_r[None, :] < R),
                                 other=0.0)
                    acc += _dot(xt, wt, IEEE)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + offs_r[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < S) & (offs_r[None, :] < R))

    @triton.jit
    def _expand_add_kernel(out_ptr, low_ptr, w_ptr, bias_ptr, offsets_ptr, scale, S, N, R, E, stride_o, stride_l,
                           stride_we, stride_wr, stride_wn, stride_be, HAS_BIAS: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_E: tl.constexpr, IEEE: tl.constexpr):
        """Program (row tile, column tile): out[s, n] += scale * sum_r low[s, r] w[e(s), r, n] (+ bias[e(s), n])."""
        row0 = tl.program_id(0) * BLOCK_S
        rows = row0 + tl.arange(0, BLOCK_S)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        first, last = _tile_experts(offsets_ptr, E, row0, tl.minimum(row0 + BLOCK_S, S), BLOCK_E)
        acc = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
        shift = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
        for e in range(first, last + 1):
            start, end = _group_span(offsets_ptr, e)
            if start < end:
                live = ((rows >= start) & (rows < end))[:, None]
                w_e = w_ptr + e * stride_we + cols[None, :] * stride_wn
                for r0 in range(0, R, BLOCK_R):
                    rs = r0 + tl.arange(0, BLOCK_R)
                    lt = tl.load(low_ptr + rows.to(tl.int64)[:, None] * stride_l + rs[None, :],
                                 mask=live & (rs[None, :] < R), other=0.0)
                    wt = tl.load(w_e + rs[:, None] * stride_wr, mask=(rs[:, None] < R) & (cols[None, :] < N),
                                 other=0.0)
                    acc += _dot(lt, wt, IEEE)
                if HAS_BIAS:
                    b = tl.load(bias_ptr + e * stride_be + cols, mask=cols < N, other=0.0).to(tl.float32)
                    shift += tl.where(live, b[None, :], 0.0)
        ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
        mask = (rows[:, None] < S) & (cols[None, :] < N)
        base = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (base + scale * acc + shift).to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(p: int, q: int) -> tuple[int, int]:
    """Tile sides: the rank side whole (16..64), the wide side 128 (tl.dot needs every side >= 16)."""
    small = lambda n: min(64, max(16, next_pow2(n)))  # noqa: E731
    if p <= q:
        return small(p), 128 if q > 64 else small(q)
    return 128 if p > 64 else small(p), small(q)


def grouped_weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e^T @ dy_e into `out` (E, P, Q) (any strides, written in its dtype): x (S, P) and dy (S, Q)
    rows sorted by expert (row-contiguous), `offsets` (E,) int32 the cumulative row ends. Sums in fp32. The Triton
    kernel where use_triton(x) and both are 16-bit or fp32, else the reference. Returns out."""
    if not (use_triton(x) and x.dtype == dy.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return grouped_weight_grad_reference(x, dy, offsets, out)
    x, dy = x.contiguous(), dy.contiguous()
    e, p, q = out.shape
    bp, bq = _blocks(p, q)
    grid = (e, triton.cdiv(p, bp), triton.cdiv(q, bq))
    _grouped_weight_grad_kernel[grid](x, dy, offsets, out, p, q, x.stride(0), dy.stride(0), *out.stride(),
                                      BLOCK_P=bp, BLOCK_Q=bq, BLOCK_S=64,
                                      IEEE=x.dtype == torch.float32, num_warps=4)
    return out




def _rank_block(r: int) -> int:
    return min(64, max(16, next_pow2(r)))  # tl.dot needs every side >= 16


def _kernels_take(*tensors: torch.Tensor) -> bool:
    """Our kernels run on these: use_triton, one dtype among bf16/fp16/fp32."""
    return use_triton(tensors[0]) and len({t.dtype for t in tensors}) == 1 and \
        tensors[0].dtype in (torch.bfloat16, torch.float16, torch.float32)


def grouped_thin_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[s] = x[s] @ w[e(s)] for rows sorted by expert: x (S, K), w (E, K, R) with R small (a LoRA rank; any
    strides), offsets (E,) int32 cumulative row ends. Returns (S, R) in x's dtype, summed in fp32 (rows past
    offsets[-1] are 0). The Triton kernel where use_triton(x) and x, w share a 16-bit or fp32 dtype, else the
    reference. Not differentiable (expert_lora_linear's backward calls it)."""
    if not _kernels_take(x, w) or x.shape[0] == 0:
        return grouped_thin_mm_reference(x, w, offsets)
    x = x.contiguous()
    s, k = x.shape
    e, _, r = w.shape
    out = torch.empty(s, r, device=x.device, dtype=x.dtype)
    block_r = _rank_block(r)
    grid = (triton.cdiv(s, 64), triton.cdiv(r, block_r))
    _thin_mm_kernel[grid](x, w, offsets, out, s, k, r, e, x.stride(0), *w.stride(), out.stride(0), BLOCK_S=64,
                          BLOCK_K=128, BLOCK_R=block_r, BLOCK_E=next_pow2(e), IEEE=x.dtype == torch.float32,
                          num_warps=4)
    return out


def grouped_expand_add_(out: torch.Tensor, low: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, scale: float,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """In place, for rows sorted by expert: out[s] += scale * low[s] @ w[e(s)] (+ bias[e(s)]). out (S, N)
    contiguous, low (S, R), w (E, R, N) (any strides), bias (E, N) or None, offsets (E,) int32 cumulative row ends.
    Sums in fp32 and rounds once into out's dtype. The Triton kernel where use_triton(out) and low, w share out's
    16-bit or fp32 dtype, else the reference. Returns out."""
    if not (_kernels_take(out, low, w) and out.is_contiguous()) or out.shape[0] == 0:
        return grouped_expand_add_reference(out, low, w, offsets, scale, bias)
    low = low.contiguous()
    s, n = out.shape
    e, r, _ = w.shape
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    grid = (triton.cdiv(s, 64), triton.cdiv(n, 128))
    _expand_add_kernel[grid](out, low, w, bias_arg, offsets, float(scale), s, n, r, e, out.stride(0), low.stride(0),
                             *w.stride(), bias_arg.stride(0), HAS_BIAS=has_bias, BLOCK_S=64, BLOCK_N=128,
                             BLOCK_R=_rank_block(r), BLOCK_E=next_pow2(e), IEEE=out.dtype == torch.float32,
                             num_warps=4)
    return out


def _like(w: torch.Tensor) -> torch.Tensor:
    """An empty tensor in w's strides where they are dense (lora_A's (E, in, r) view of (E, r, in)), else contiguous."""
    if w.is_contiguous() or w.transpose(1, 2).is_contiguous():
        return torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


class _ExpertLoraLinear(torch.autograd.Function):
    """y = mm(x, weight(dtype)) + scale * (x @ a_e) @ b_e (+ bias_e) on expert-sorted rows, the base frozen."""

    @staticmethod
    def forward(ctx, x, a, b, offsets, counts, weight, mm, scale, bias, again):
        """x (S, K); a (E, K, r), b (E, r, N); weight: dtype -> the frozen (E, K, N) operand; mm(x, w, offsets,
        counts): the grouped GEMM; bias (E, N) frozen or None; again: (fn, sources) rebuilding x in backward
        instead of keeping it (kernels/rebuild.py), or None. Returns (S, N); saves x (or again's sources), a, b and
        low = x @ a_e."""
        out = mm(x, weight(x.dtype), offsets, counts)
        low = grouped_thin_mm(x, a, offsets)
        grouped_expand_add_(out, low, b, offsets, scale, bias)
        kept = (x,) if again is None else again[1]
        ctx.rebuild, ctx.n_kept = None if again is None else again[0], len(kept)
        ctx.save_for_backward(*kept, a, b, offsets, counts, low)
        ctx.weight, ctx.mm, ctx.scale = weight, mm, scale
        return out

    @staticmethod
    def backward(ctx, dy):
        """dy (S, N) -> dx = dy @ W_e^T + g @ a_e^T (accumulated in place), da = x_e^T g_e, db = scale low_e^T dy_e,
        with g = scale * dy @ b_e^T; None for the rest."""
        saved = ctx.saved_tensors
        kept, (a, b, offsets, counts, low) = saved[:ctx.n_kept], saved[ctx.n_kept:]
        x = kept[0] if ctx.rebuild is None else rebuild.rebuilt(ctx.rebuild, kept)
        dy = dy.contiguous()
        g = grouped_thin_mm(dy, b.transpose(1, 2), offsets).mul_(ctx.scale)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = ctx.mm(dy, ctx.weight(dy.dtype).transpose(1, 2), offsets, counts)
            grouped_expand_add_(dx, g, a.transpose(1, 2), offsets, 1.0)
        if ctx.needs_input_grad[1]:
            da = grouped_weight_grad(x, g, offsets, _like(a))
        if ctx.needs_input_grad[2]:
            db = grouped_weight_grad(low * ctx.scale, dy, offsets, _like(b))
        return dx, da, db, None, None, None, None, None, None, None


def expert_lora_linear(x: torch.Tensor, weight, mm, a: torch.Tensor, b: torch.Tensor, scale: float,
                       offsets: torch.Tensor, counts: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A frozen expert weight plus its LoRA on rows sorted by expert: y[s] = x[s] @ W_e + scale * (x[s] @ a_e) @ b_e
    (+ bias_e), e = e(s), with the rank-r product added into the base output and into the base's input gradient in
    place (nothing (S, N)- or (S, K)-sized is written for the LoRA).

    x (S, K); weight: a callable dtype -> (E, K, N) tensor (a view or a fresh dequantisation; called again in
    backward, so nothing weight-sized is saved); mm(x, w, offsets, counts): the grouped GEMM for the base
    (models/moe.py's grouped_mm); a (E, K, r), b (E, r, N) in x's dtype (ExpertLora.factors); offsets/counts (E,)
    int32 cumulative row ends and group sizes; bias (E, N) or None (not trained). Returns (S, N) in x's dtype,
    differentiable in x, a and b. An x marked by kernels/rebuild.py (lean saves) is rebuilt in backward instead of
    kept."""
    again = rebuild.rebuild_of(x) if torch.is_grad_enabled() else None
    return _ExpertLoraLinear.apply(x, a, b, offsets, counts, weight, mm, scale, bias, again)
