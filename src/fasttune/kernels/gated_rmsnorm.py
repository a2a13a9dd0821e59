"""Grouped gated RMSNorm, Mamba-2's output norm: the RMSNorm of y * SiLU(z) over each of `groups` equal channel
groups, times w (transformers' MambaRMSNormGated / GraniteMoeHybridRMSNormGated, mamba_ssm's norm_before_gate=False),
or with `before_gate` the RMSNorm of y, times w, times SiLU(z) (Falcon-H1's mamba_norm_before_gate). fp32 math.

The torch reference computes as transformers does: eight or so fp32 passes over (tokens x channels) forward and more
backward, each a full read and write of the mixer's widest activation (10,240 channels a token at Nemotron Nano 2's
size). The Triton kernels read y and z once per direction, write the result in the out_proj input's dtype, and keep
only 1/rms per (row, group) for backward; the weight's gradient (full fine-tuning only) is computed in torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                             before_gate: bool = False) -> torch.Tensor:
    """y, z (..., D) any float dtypes, weight (D,), D a multiple of groups -> (..., D) fp32 (transformers'
    arithmetic: the norm's statistics per group of D / groups channels, everything in fp32)."""
    h = y.float() if before_gate else y.float() * F.silu(z.float())
    g = h.view(*h.shape[:-1], groups, h.shape[-1] // groups)  # (an explicit size: no rows is valid too)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    out = weight.float() * g.view(h.shape)
    return out * F.silu(z.float()) if before_gate else out


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_fwd(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, y_stride, z_stride, width, groups, eps,
                   BLOCK: tl.constexpr, BEFORE: tl.constexpr):
        """One (row, group): out = w * norm(y * silu(z)) (or w * norm(y) * silu(z)); 1/rms saved."""
        row, grp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        cols = grp * width + offs
        y = tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        h = y if BEFORE else y * gate
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / width + eps)
        out = h * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if BEFORE:
            out = out * gate
        tl.store(out_ptr + row * width * groups + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row * groups + grp, rstd)

    @triton.jit
    def _gated_bwd(dout_ptr, y_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dz_ptr, y_stride, z_stride, width, groups,
                   BLOCK: tl.constexpr, BEFORE: tl.constexpr):
        """One (row, group): dy and dz from dout (RMSNorm's backward through the group's statistics)."""
        row, grp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        cols = grp * width + offs
        dense = row * width * groups + cols
        dout = tl.load(dout_ptr + dense, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row * groups + grp)
        sig = tl.sigmoid(z)
        gate = z * sig
        dgate = sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
        if BEFORE:
            n = y * rstd
            dn = dout * w * gate
            dy = rstd * (dn - n * (tl.sum(dn * n, axis=0) / width))
            dz = dout * w * n * dgate
        else:
            hhat = y * gate * rstd
            dhhat = dout * w
            dh = rstd * (dhhat - hhat * (tl.sum(dhhat * hhat, axis=0) / width))
            dy = dh * gate
            dz = dh * y * dgate
        tl.store(dy_ptr + dense, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + dense, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (rows, D) with unit column stride (a view where the layout allows: z is a slice of in_proj's
    output, read in place)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _GatedRMSNormFunction(torch.autograd.Function):
    """gated_rms_norm_reference(...).to(out_dtype) by the Triton kernels (fp32 inside)."""

    @staticmethod
    def forward(ctx, y, z, weight, groups, eps, before_gate, out_dtype):
        """y, z (..., D), weight (D,) -> (..., D) in out_dtype; saves y, z, weight and 1/rms per (row, group)."""
        y2, z2 = _rows(y), _rows(z)
        rows, dim = y2.shape
        width = dim // groups
        out = torch.empty(rows, dim, dtype=out_dtype, device=y.device)
        rstd = torch.empty(rows, groups, dtype=torch.float32, device=y.device)
        block = next_pow2(width)
        if rows:
            _gated_fwd[(rows, groups)](y2, z2, weight, out, rstd, y2.stride(0), z2.stride(0), width, groups, eps,
                                       BLOCK=block, BEFORE=before_gate, num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.groups, ctx.before, ctx.shapes = groups, before_gate, (y.shape, z.shape)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout):
        """dout (..., D) -> (dy in y's dtype, dz in z's dtype, dweight (None when frozen), None, None, None, None)."""
        y2, z2, weight, rstd = ctx.saved_tensors
        rows, dim = y2.shape
        width = dim // ctx.groups
        d2 = dout.reshape(rows, dim).contiguous()
        dy = torch.empty(rows, dim, dtype=y2.dtype, device=y2.device)
        dz = torch.empty(rows, dim, dtype=z2.dtype, device=z2.device)
        block = next_pow2(width)
        if rows:
            _gated_bwd[(rows, ctx.groups)](d2, y2, z2, weight, rstd, dy, dz, y2.stride(0), z2.stride(0), width,
                                           ctx.groups, BLOCK=block, BEFORE=ctx.before,
                                           num_warps=min(16, max(1, block // 256)))
        dw = None
        if ctx.needs_input_grad[2]:  # w's gradient: dout times y * rstd * silu(z) (either order), summed over rows
            normed = y2.float() * rstd.repeat_interleave(width, dim=1) * F.silu(z2.float())
            dw = (d2.float() * normed).sum(0).to(weight.dtype)
        return dy.view(ctx.shapes[0]), dz.view(ctx.shapes[1]), dw, None, None, None, None


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                   before_gate: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The grouped gated RMSNorm (module docstring) of y (..., D) with gate z (..., D) and weight (D,), D a multiple
    of groups, returned in out_dtype: the Triton kernels where `use_triton(y)`, else gated_rms_norm_reference
    (fp32) cast to out_dtype."""
    if use_triton(y):
        return _GatedRMSNormFunction.apply(y, z, weight, groups, eps, before_gate, out_dtype)
    return gated_rms_norm_reference(y, z, weight, groups, eps, before_gate).to(out_dtype)
