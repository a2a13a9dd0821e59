"""The low-rank terms of a LoRA group for a few rows (decode steps) in two Triton launches.

For the layers i of a group reading the same input x (q/k/v, gate/up, or one o/down projection), with the group's A
factors stacked (R = sum of ranks, K) and each B_i (N_i, r_i):

    out_i = bias_i + s_i * (x @ A_i^T) @ B_i^T          (or out_i += ..., `accumulate`, for FP8 bases)

cuBLAS runs this as one split-K GEMM plus its reduction for x @ A^T and one GEMM per layer for the B products: at the
64 rows of GRPO's sampling on the Llama-3.1-8B shape, 15 kernels a layer that took ~1.4 ms of each 6.3 ms decode
step. Here `_shrink_kernel` sums x @ A^T over chunks of K, one program per chunk (partial sums in fp32, never added
with atomics, so the result does not depend on scheduling), and `_expand_kernel` adds a row block's partials in chunk
order and multiplies by B_i, one program per block of a layer's output columns, all layers of the group in one
launch. The roundings are the unfused path's (kernels/lora.py): x @ A^T rounded to x's dtype, then the scale, then
the B product summed in fp32 with the bias (or onto the existing output) and rounded once.

`lora_delta_reference` is the same function in torch.
"""
from __future__ import annotations

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton

MAX_ROWS = 128  # beyond, cuBLAS' GEMMs are as fast
MAX_LAYERS = 3
MAX_RANK_SUM = 128  # a group's ranks in all (q/k/v at r <= 32, gate/up at r <= 64): the partials' tile stays small


def lora_delta_reference(x: torch.Tensor, a_all: torch.Tensor, bs: list[torch.Tensor], scales: list[float],
                         outs: list[torch.Tensor], biases: list[torch.Tensor] | None = None,
                         accumulate: bool = False) -> None:
    """Writes (or with accumulate adds) each layer's low-rank term into outs[i] (M, N_i), in place.

    x (M, K), a_all (R, K) the layers' A factors stacked in layer order, bs[i] (N_i, r_i), all in x's dtype; scales:
    s_i; biases: (N_i,) per layer or None. kernels/lora.py's unfused arithmetic: xa = x @ A^T rounded to x's dtype,
    times s_i (rounded), then bias + xs @ B^T (or out + xs @ B^T) summed in fp32 and rounded once."""
    xa_all = x @ a_all.t()
    for xa, b, s, out, i in zip(xa_all.split([b.shape[1] for b in bs], dim=1), bs, scales, outs, range(len(bs))):
        xs = xa * s if s != 1 else xa
        if accumulate:
            out.addmm_(xs, b.t())
        elif biases is not None:
            torch.addmm(biases[i], xs, b.t(), out=out)
        else:
            torch.mm(xs, b.t(), out=out)


def fits(x: torch.Tensor, bs: list[torch.Tensor]) -> bool:
    """Whether `lora_delta` takes the Triton kernels for x (M, K) and these B factors: Triton runs for x (see
    dispatch.use_triton), x's columns are contiguous, M <= MAX_ROWS, at most MAX_LAYERS layers and MAX_RANK_SUM ranks
    in all."""
    return (use_triton(x) and x.stride(-1) == 1 and x.shape[0] <= MAX_ROWS and 1 <= len(bs) <= MAX_LAYERS
            and sum(b.shape[1] for b in bs) <= MAX_RANK_SUM)


def lora_delta(x: torch.Tensor, a_all: torch.Tensor, bs: list[torch.Tensor], scales: list[float],
               outs: list[torch.Tensor], biases: list[torch.Tensor] | None = None, accumulate: bool = False) -> None:
    """`lora_delta_reference` in two Triton launches where `fits(x, bs)`, else the reference. Arguments as there;
    outs[i] must be contiguous (M, N_i) in x's dtype."""
    if not fits(x, bs):
        lora_delta_reference(x, a_all, bs, scales, outs, biases, accumulate)
        return
    m, k = x.shape
    ranks = [b.shape[1] for b in bs]
    rank_total = sum(ranks)
    block_m = min(64, max(16, next_pow2(m)))
    block_rt = max(16, next_pow2(rank_total))  # the partials' row width
    block_k = 128 if block_rt <= 64 else 64  # (the A tile, block_rt x block_k, is staged in shared memory)
    chunk = 512 if k > 8192 else 256  # ~16-28 programs for the 4,096- and 14,336-wide inputs of an 8B layer
    chunks = -(-k // chunk)
    m_blocks = -(-m // block_m)
    widen = not x.is_cuda or x.dtype == torch.float32  # fp32 products, exact ones (the interpreter's bf16 is wrong)
    partials = torch.empty(chunks, m, block_rt, dtype=torch.float32, device=x.device)
    _shrink_kernel[(chunks, m_blocks)](x, a_all, partials, m, k, rank_total, x.stride(0), CHUNK=chunk,
                                      BLOCK_M=block_m, BLOCK_R=block_rt, BLOCK_K=block_k, WIDEN=widen)
    block_n = 128
    tiles = [-(-b.shape[0] // block_n) for b in bs]
    starts = [0, tiles[0], tiles[0] + (tiles[1] if len(bs) > 1 else 0)]
    offsets = [sum(ranks[:i]) for i in range(len(bs))]
    pad = lambda seq, fill: list(seq) + [fill] * (MAX_LAYERS - len(seq))  # noqa: E731 (unused layer slots)
    b_ptrs, o_ptrs = pad(bs, bs[0]), pad(outs, outs[0])
    bias_ptrs = pad(biases, biases[0]) if biases is not None else [outs[0]] * MAX_LAYERS
    n_sizes, r_sizes = pad([b.shape[0] for b in bs], 0), pad(ranks, 0)
    r_offsets, s_values = pad(offsets, 0), pad([float(s) for s in scales], 1.0)
    _expand_kernel[(sum(tiles), m_blocks)](
        partials, *b_ptrs, *o_ptrs, *bias_ptrs, m, chunks, *n_sizes, *r_sizes, *r_offsets, *s_values,
        starts[1], starts[2], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, next_pow2(max(ranks))),
        BLOCK_RT=block_rt, HAS_BIAS=biases is not None, ACCUMULATE=accumulate, WIDEN=widen)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, p_ptr, M, K, R, stride_x, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr):
        """Program (chunk c of K, block of BLOCK_M rows): partials[c, m, j] = sum over k in chunk c of x[m, k] A[j, k]
        (fp32; columns j >= R are zeros)."""
        c = tl.program_id(0)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                        other=0.0)
            if WIDEN:
                acc = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(a), acc)
        tl.store(p_ptr + (c * M + rm)[:, None] * BLOCK_R + rr[None, :], acc, mask=rm[:, None] < M)

    @triton.jit
    def _expand_kernel(p_ptr, b0, b1, b2, o0, o1, o2, bias0, bias1, bias2, M, C, N0, N1, N2, R0, R1, R2,
                       OFF0, OFF1, OFF2, S0, S1, S2, T1, T2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_RT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACCUMULATE: tl.constexpr, WIDEN: tl.constexpr):
        """Program (tile t of the group's output columns, block of BLOCK_M rows): tiles [0, T1) are layer 0's, [T1,
        T2) layer 1's, the rest layer 2's. out[m, n] = bias[n] (or out[m, n]) + sum_j xs[m, j] B[n, j], xs = the
        layer's rank columns of the partials summed in chunk order, rounded to the output dtype, times S, rounded."""
        t = tl.program_id(0)
        if t < T1:
            b_ptr, o_ptr, bias_ptr, N, r, off, s, n0 = b0, o0, bias0, N0, R0, OFF0, S0, t * BLOCK_N
        elif t < T2:
            b_ptr, o_ptr, bias_ptr, N, r, off, s, n0 = b1, o1, bias1, N1, R1, OFF1, S1, (t - T1) * BLOCK_N
        else:
            b_ptr, o_ptr, bias_ptr, N, r, off, s, n0 = b2, o2, bias2, N2, R2, OFF2, S2, (t - T2) * BLOCK_N
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rm[:, None] < M
        xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for c in range(0, C):
            xa += tl.load(p_ptr + (c * M + rm)[:, None] * BLOCK_RT + off + rr[None, :],
                          mask=row_ok & (rr[None, :] < r), other=0.0)
        dtype = o_ptr.dtype.element_ty
        xs = xa.to(dtype).to(tl.float32)  # as x @ A^T's output in x's dtype
        if s != 1.0:
            xs = (xs * s).to(dtype).to(tl.float32)
        b = tl.load(b_ptr + rn[:, None] * r + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < r), other=0.0)
        if WIDEN:
            acc = tl.dot(xs, tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            acc = tl.dot(xs.to(dtype), tl.trans(b))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        out_mask = row_ok & (rn[None, :] < N)
        if ACCUMULATE:
            acc += tl.load(o_ptr + rm[:, None] * N + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + rm[:, None] * N + rn[None, :], acc.to(dtype), mask=out_mask)
