"""RMSNorm. Statistics in fp32; `offset=1.0` gives Gemma's (1 + w) scale.

The Triton kernel reads each row once and saves only the input and the fp32 reciprocal RMS for backward (the
torch reference keeps several fp32 copies). The weight gradient, needed only when norms train (full
fine-tuning), is computed in torch from the saved statistics.
"""
import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        # Gemma scales in fp32 before the cast back (matches transformers' GemmaRMSNorm).
        return (h * (offset + weight.float())).to(x.dtype)
    # Llama casts back first, then scales in the weight's dtype (matches LlamaRMSNorm).
    return weight * h.to(x.dtype)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, offset, stride, BLOCK: tl.constexpr,
                 GEMMA: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        if GEMMA:
            y = x * rstd * (offset + w)
        else:  # round to the activation dtype before scaling, as the reference does
            y = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(y_ptr + row * stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, offset, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(dy_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dn = dy * (offset + w)
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row * stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = next_pow2(shape[-1])
        _rms_fwd[(x2.shape[0],)](x2, weight, y, rstd, shape[-1], eps, offset, x2.stride(0), BLOCK=block,
                                 GEMMA=bool(offset), num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape, ctx.block = offset, shape, block
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx = torch.empty_like(x2)
        _rms_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, x2.shape[1], ctx.offset, x2.stride(0),
                                 BLOCK=ctx.block, num_warps=min(16, max(1, ctx.block // 256)))
        dw = None
        if ctx.needs_input_grad[1]:
            xhat = x2.float() * rstd[:, None]
            if not ctx.offset:
                xhat = xhat.to(x2.dtype).float()
            dw = (dy2.float() * xhat).sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    if use_triton(x):
        return _RMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)
