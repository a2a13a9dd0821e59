"""Grouped GEMMs of the experts' LoRA factors, with their weight gradient in one Triton kernel.

An MoE layer's expert LoRA multiplies the expert-sorted rows by thin per-expert factors: xs (S, H) @ a_e (H, r) and
low (S, r) @ b_e (r, N). The forward and the input gradient are ordinary grouped GEMMs (torch's kernel). The
weight gradient is the grouped product over the rows,

    dw[e] = x[rows of e]^T @ dy[rows of e]        (P x Q, with P or Q the rank),

a "K-grouped" GEMM whose output is tiny and whose input is a full pass over the rows. torch's grouped GEMM kernel
runs it at about a quarter of the card's memory speed (a profile of Qwen3-30B-A3B with expert LoRA: four of them
per layer at ~130 us, ~10% of the step). `grouped_weight_grad` gives each program one expert and one (P, Q) tile
and walks that expert's rows, so x and dy are each read once, with fp32 accumulation. `grouped_weight_grad_reference`
is the same in torch (a loop over experts), which runs on a CPU and under FASTTUNE_KERNELS=torch.
"""
from __future__ import annotations

import torch

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


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _grouped_weight_grad_kernel(x_ptr, dy_ptr, offsets_ptr, out_ptr, P, Q, stride_x, stride_dy,
                                    stride_oe, stride_op, stride_oq, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                                    BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
        """Program (e, p-tile, q-tile): sum over expert e's rows of x[s, p] * dy[s, q], fp32."""
        e = tl.program_id(0)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        end = tl.load(offsets_ptr + e).to(tl.int64)
        start = tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0).to(tl.int64)
        acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            live = rows < end
            xt = tl.load(x_ptr + rows[None, :] * stride_x + offs_p[:, None],
                         mask=live[None, :] & (offs_p[:, None] < P), other=0.0)  # (BLOCK_P, BLOCK_S)
            g = tl.load(dy_ptr + rows[:, None] * stride_dy + offs_q[None, :],
                        mask=live[:, None] & (offs_q[None, :] < Q), other=0.0)  # (BLOCK_S, BLOCK_Q)
            if IEEE:  # fp32 inputs: full fp32 products (the default would round them to tf32)
                acc += tl.dot(xt, g, input_precision="ieee")
            else:
                acc += tl.dot(xt, g)
        tl.store(out_ptr + e * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q))


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


class _LoraGroupedMM(torch.autograd.Function):
    """y = grouped_mm(x, w): forward and dx through torch's grouped GEMM kernel, dw through grouped_weight_grad.
    x (S, K) sorted by expert, w (E, K, N) (a strided view is fine; dw gets w's strides), offsets (E,) int32."""

    @staticmethod
    def forward(ctx, x, w, offsets, mm):
        """x (S, K), w (E, K, N), offsets (E,) int32; mm: the grouped GEMM. Returns (S, N); saves x, w, offsets."""
        ctx.save_for_backward(x, w, offsets)
        ctx.mm = mm
        return mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        """dy (S, N) -> (dx (S, K) by mm, dw (E, K, N) in w's strides by grouped_weight_grad, None, None)."""
        x, w, offsets = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ctx.mm(dy, w.transpose(1, 2), offs=offsets)
        if ctx.needs_input_grad[1]:
            dense = w.is_contiguous() or w.transpose(1, 2).is_contiguous()  # lora_A's view: (E, in, r) of (E, r, in)
            dw = (torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device) if dense
                  else torch.empty(w.shape, dtype=w.dtype, device=w.device))
            grouped_weight_grad(x, dy, offsets, dw)
        return dx, dw, None, None


def lora_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, mm) -> torch.Tensor:
    """x (S, K) @ w[e] (K, N) per expert group (offsets (E,) int32 cumulative row ends), through `mm` (torch's
    grouped GEMM, F.grouped_mm or torch._grouped_mm); the weight gradient by grouped_weight_grad. Returns (S, N)
    in x's dtype, differentiable in x and w."""
    return _LoraGroupedMM.apply(x, w, offsets, mm)
