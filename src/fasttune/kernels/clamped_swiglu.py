"""gpt-oss's clamped SwiGLU on its interleaved gate_up, forward and backward each in one Triton pass.

    gate = gate_up[..., 0::2] clamped above at `limit`;  up = gate_up[..., 1::2] clamped to [-limit, limit]
    y = (up + 1) * gate * sigmoid(alpha * gate)

(transformers' GptOssExperts._apply_gate). In torch it is about ten elementwise kernels forward and more backward
over the (rows, 2I) expert activations, and autograd keeps several of its intermediates; the kernel computes in
fp32, rounds once, saves only gate_up and recomputes the rest in backward. The clamps pass the gradient where the
input lies inside the closed interval, as torch's clamp does.
"""
from __future__ import annotations

from functools import partial

import torch

from fasttune.kernels import rebuild
from fasttune.kernels.dispatch import HAVE_TRITON, use_triton

_BLOCK = 1024


def clamped_swiglu_reference(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gate_up (..., 2I) interleaved (gate at even columns, up at odd ones) -> (..., I) in gate_up's dtype, in
    torch ops (transformers' GptOssExperts._apply_gate)."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _clamped_swiglu_fwd(x_ptr, y_ptr, n, limit, alpha, BLOCK: tl.constexpr):
        """y[i] = (clamp(x[2i+1]) + 1) * glu(min(x[2i], limit)) over the flat (rows * I) output."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.minimum(tl.load(x_ptr + 2 * offs, mask=mask, other=0.0).to(tl.float32), limit)
        u = tl.load(x_ptr + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        y = (u + 1.0) * g * tl.sigmoid(alpha * g)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _clamped_swiglu_bwd(dy_ptr, x_ptr, dx_ptr, n, limit, alpha, BLOCK: tl.constexpr):
        """dx (rows, 2I) interleaved like x from dy (rows * I): d gate = dy (u + 1) glu'(g) where gate <= limit,
        d up = dy glu(g) where -limit <= up <= limit."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_in = tl.load(x_ptr + 2 * offs, mask=mask, other=0.0).to(tl.float32)
        u_in = tl.load(x_ptr + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(g_in, limit)
        u = tl.minimum(tl.maximum(u_in, -limit), limit)
        s = tl.sigmoid(alpha * g)
        glu = g * s
        dg = tl.where(g_in <= limit, dy * (u + 1.0) * (s + alpha * glu * (1.0 - s)), 0.0)
        du = tl.where((u_in >= -limit) & (u_in <= limit), dy * glu, 0.0)
        tl.store(dx_ptr + 2 * offs, dg.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + 2 * offs + 1, du.to(dx_ptr.dtype.element_ty), mask=mask)


class _ClampedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, limit, alpha):
        """gate_up (..., 2I) -> (..., I); saves gate_up only."""
        gate_up = gate_up.contiguous()
        y = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
        n = y.numel()
        _clamped_swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate_up, y, n, float(limit), float(alpha), BLOCK=_BLOCK)
        ctx.save_for_backward(gate_up)
        ctx.limit, ctx.alpha = float(limit), float(alpha)
        return y

    @staticmethod
    def backward(ctx, dy):
        """dy (..., I) -> (d gate_up (..., 2I) interleaved, None, None)."""
        (gate_up,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(gate_up)
        n = dy.numel()
        _clamped_swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate_up, dx, n, ctx.limit, ctx.alpha, BLOCK=_BLOCK)
        return dx, None, None


def clamped_swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's activation on interleaved (..., 2I) gate/up -> (..., I): gate = [..., ::2] clamped above at
    `limit`, up = [..., 1::2] clamped to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate). The Triton
    kernels where use_triton(gate_up) (fp32 inside, one rounding; only gate_up saved for backward), else
    clamped_swiglu_reference. Raises ValueError for an odd last dimension."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension {gate_up.shape[-1]} is odd: it must interleave gate and up")
    if use_triton(gate_up) and gate_up.numel():
        y = _ClampedSwiGLU.apply(gate_up, limit, alpha)
        if rebuild.active() and gate_up.is_contiguous():  # (else the saved one is a copy: nothing to share)
            rebuild.mark(y, partial(_again, limit=float(limit), alpha=float(alpha)), gate_up.detach())
        return y
    return clamped_swiglu_reference(gate_up, limit, alpha)


def _again(gate_up, *, limit, alpha):
    """_ClampedSwiGLU's output again from its saved gate_up (kernels/rebuild.py)."""
    y = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    n = y.numel()
    _clamped_swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate_up, y, n, limit, alpha, BLOCK=_BLOCK)
    return y
