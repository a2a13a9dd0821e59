"""RMSNorm. Statistics in fp32; `offset=1.0` gives Gemma's (1 + w) scale.

The Triton kernel reads each row once and saves only the input and the fp32 reciprocal RMS for backward (the
torch reference keeps several fp32 copies). The weight gradient, needed only when norms train (full
fine-tuning), is computed in torch from the saved statistics. `add_rms_norm` also folds a decoder layer's residual
add into the norm (forward) and the residual gradient into the norm's input gradient (backward).
"""
from functools import partial

import torch

from fasttune.kernels import rebuild
from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       fp32_scale: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim; x (..., H), weight (H,). Rounding as
    transformers' LlamaRMSNorm (offset 0: cast, then scaled in the weight's dtype) and GemmaRMSNorm (offset 1.0:
    scaled in fp32, then cast); fp32_scale=True scales in fp32 with offset 0 (Gemma4RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset or fp32_scale:
        # Gemma scales in fp32 before the cast back (matches transformers' GemmaRMSNorm).
        return (h * (offset + weight.float())).to(x.dtype)
    # Llama casts back first, then scales in the weight's dtype (matches LlamaRMSNorm).
    return weight * h.to(x.dtype)


def add_rms_norm_reference(x, h, weight, eps: float, offset: float = 0.0, fp32_scale: bool = False):
    """(s, rms_norm(s)) with s = x + h, or s = x when h is None: a decoder layer's residual and normed input."""
    s = x if h is None else x + h
    return s, rms_norm_reference(s, weight, eps, offset, fp32_scale)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_fwd(x_ptr, h_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps, offset, stride,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr, GEMMA: tl.constexpr, ADD: tl.constexpr,
                 RSTD_GIVEN: tl.constexpr = False):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        at = rows[:, None] * stride + cols[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if ADD:  # the residual add, rounded to the activation dtype as a separate add would be
            x = (x + tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32))
            x = x.to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + at, x, mask=mask)
            x = x.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        if RSTD_GIVEN:  # the output again from the saved statistics (kernels/rebuild.py): bitwise the same
            rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        if GEMMA:
            y = x * rstd[:, None] * (offset + w)
        else:  # round to the activation dtype before scaling, as the reference does
            y = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)
        if not RSTD_GIVEN:
            tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def _rms_bwd(dy_ptr, ds_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_rows, n_cols, offset, stride,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        at = rows[:, None] * stride + cols[None, :]
        dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
        xhat = x * rstd
        dn = dy * (offset + w)
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=1) / n_cols)[:, None])
        if RESIDUAL:  # the gradient reaching the residual stream directly, added here instead of in a pass
            dx = dx.to(dx_ptr.dtype.element_ty).to(tl.float32)
            dx += tl.load(ds_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _tiling(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK columns, ROWS per program, warps): short rows (per-head q/k norms, 64-256 wide) share a program, as
    one program per 128-element row leaves the card mostly idle."""
    block = next_pow2(n_cols)
    rows = max(1, 2048 // block)
    return block, rows, min(16, max(1, block * rows // 256))


def _launch_fwd(x2, h2, weight, eps, offset, fp32_scale=False):
    y, s = torch.empty_like(x2), (torch.empty_like(x2) if h2 is not None else x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
    block, rows, warps = _tiling(x2.shape[1])
    _rms_fwd[(triton.cdiv(x2.shape[0], rows),)](x2, x2 if h2 is None else h2, s, weight, y, rstd, x2.shape[0],
                                                x2.shape[1], eps, offset, x2.stride(0), BLOCK=block, ROWS=rows,
                                                GEMMA=bool(offset) or fp32_scale, ADD=h2 is not None,
                                                num_warps=warps)
    return s, y, rstd


def _rebuild(x2, weight, rstd, *, offset, fp32_scale, shape):
    """The norm's output again from its saved input x2 (rows, H) and 1/rms (rows,): one elementwise pass."""
    y = torch.empty_like(x2)
    block, rows, warps = _tiling(x2.shape[1])
    _rms_fwd[(triton.cdiv(x2.shape[0], rows),)](x2, x2, x2, weight, y, rstd, x2.shape[0], x2.shape[1], 0.0, offset,
                                                x2.stride(0), BLOCK=block, ROWS=rows,
                                                GEMMA=bool(offset) or fp32_scale, ADD=False, RSTD_GIVEN=True,
                                                num_warps=warps)
    return y.view(shape)


def _launch_bwd(ctx, dy, ds=None):
    s2, weight, rstd = ctx.saved_tensors
    dy2 = dy.reshape(s2.shape).contiguous()
    ds2 = None if ds is None else ds.reshape(s2.shape).contiguous()
    dx = torch.empty_like(s2)
    block, rows, warps = _tiling(s2.shape[1])
    _rms_bwd[(triton.cdiv(s2.shape[0], rows),)](dy2, dy2 if ds2 is None else ds2, s2, weight, rstd, dx, s2.shape[0],
                                                s2.shape[1], ctx.offset, s2.stride(0), BLOCK=block, ROWS=rows,
                                                RESIDUAL=ds2 is not None, num_warps=warps)
    dw = None
    if ctx.needs_weight_grad:
        xhat = s2.float() * rstd[:, None]
        if not (ctx.offset or ctx.fp32_scale):
            xhat = xhat.to(s2.dtype).float()
        dw = (dy2.float() * xhat).sum(0).to(weight.dtype)
    return dx.view(ctx.shape), dw


class _RMSNormFunction(torch.autograd.Function):
    """norm(x) * (offset + weight) over the last dimension, by the Triton kernels (fp32 inside)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, fp32_scale=False):
        """x (..., H), weight (H,). Returns (..., H) in x's dtype; saves x, weight and 1/rms per row."""
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        _, y, rstd = _launch_fwd(x2, None, weight, eps, offset, fp32_scale)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape, ctx.needs_weight_grad = offset, x.shape, ctx.needs_input_grad[1]
        ctx.fp32_scale = fp32_scale
        ctx.mark_non_differentiable(rstd)
        return y.view(x.shape), rstd

    @staticmethod
    def backward(ctx, dy, _drstd):
        """dy (..., H) -> (dx, dweight (None when weight is frozen), None, None, None)."""
        dx, dw = _launch_bwd(ctx, dy)
        return dx, dw, None, None, None


class _AddRMSNormFunction(torch.autograd.Function):
    """(s, norm(s)), s = x + h (or x): the residual add fused into the norm, and in backward the residual's
    gradient added to the norm's input gradient in the same kernel (each would otherwise be a full pass)."""

    @staticmethod
    def forward(ctx, x, h, weight, eps, offset, fp32_scale=False):
        """x (..., H), h like x or None, weight (H,). Returns (s, norm(s)); saves s, weight and 1/rms."""
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        h2 = None if h is None else h.reshape(x2.shape).contiguous()
        s, y, rstd = _launch_fwd(x2, h2, weight, eps, offset, fp32_scale)
        ctx.save_for_backward(s, weight, rstd)
        ctx.offset, ctx.shape, ctx.needs_weight_grad = offset, x.shape, ctx.needs_input_grad[2]
        ctx.has_h, ctx.fp32_scale = h2 is not None, fp32_scale
        ctx.mark_non_differentiable(rstd)
        s = s.view(x.shape) if h2 is not None else x.view_as(x)  # x itself: an alias, no copy
        return s, y.view(x.shape), rstd

    @staticmethod
    def backward(ctx, ds, dy, _drstd):
        """ds, dy (..., H) -> (dx, dh (= dx when h was given), dweight, None, None, None)."""
        dx, dw = _launch_bwd(ctx, dy, ds)
        return dx, dx if ctx.has_h else None, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             fp32_scale: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,): the Triton kernel where `use_triton(x)`, else `rms_norm_reference`
    (fp32_scale: see there)."""
    if use_triton(x):
        y, rstd = _RMSNormFunction.apply(x, weight, eps, offset, fp32_scale)
        if not rebuild.active() or not x.is_contiguous():  # (a non-contiguous input was saved as a copy: rebuilding
            return y  # from it would keep that copy)
        again = partial(_rebuild, offset=offset, fp32_scale=fp32_scale, shape=y.shape)
        return rebuild.mark(y, again, x.detach().view(-1, x.shape[-1]), weight.detach(), rstd)
    return rms_norm_reference(x, weight, eps, offset, fp32_scale)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 fp32_scale: bool = False):
    """(s, rms_norm(s)) with s = x + h, or s = x when h is None."""
    if use_triton(x):
        s, y, rstd = _AddRMSNormFunction.apply(x, h, weight, eps, offset, fp32_scale)
        if not rebuild.active():
            return s, y
        rows = s.detach().reshape(-1, s.shape[-1])  # the saved sum (a view: no copy)
        again = partial(_rebuild, offset=offset, fp32_scale=fp32_scale, shape=y.shape)
        return s, rebuild.mark(y, again, rows, weight.detach(), rstd)
    return add_rms_norm_reference(x, h, weight, eps, offset, fp32_scale)
