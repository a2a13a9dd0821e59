"""fp32 matmuls on TF32 tensor cores inside a block, torch's TF32 setting restored after: for fp32 work that only
carries 16-bit data (the chunked delta rule's products of bf16 activations), where TF32's 10-bit mantissas lose
nothing the inputs had (bf16 has 7, fp16 10).

torch's switch (`torch.backends.cuda.matmul.allow_tf32`, or `fp32_precision` in its newer API) is process-wide and
read when a matmul is dispatched, so a context around a forward would miss its backward, which autograd runs later:
the autograd functions that use this (kernels/delta_chunk.py, kernels/delta_scan.py) enter it in their forward and
again in their backward.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32_products():
    """TF32 for CUDA fp32 matmuls inside the block; the caller's setting (legacy or newer API) restored after."""
    flags = torch.backends.cuda.matmul
    try:
        old, name, on = flags.allow_tf32, "allow_tf32", True
    except RuntimeError:  # the caller used the newer fp32_precision API; torch refuses legacy reads after it
        old, name, on = flags.fp32_precision, "fp32_precision", "tf32"
    setattr(flags, name, on)
    try:
        yield
    finally:
        setattr(flags, name, old)


class _TF32Matmul(torch.autograd.Function):
    """a @ b with the product and both gradient products inside tf32_products (autograd runs the backward later,
    outside any context the caller held around the forward)."""

    @staticmethod
    def forward(ctx, a, b):
        """a (..., M, K), b (..., K, N) fp32 with equal batch dims -> (..., M, N)."""
        ctx.save_for_backward(a, b)
        with tf32_products():
            return a @ b

    @staticmethod
    def backward(ctx, grad):
        """grad (..., M, N) -> (grad @ b^T, a^T @ grad), each only where its input needs it."""
        a, b = ctx.saved_tensors
        with tf32_products():
            da = grad @ b.transpose(-1, -2) if ctx.needs_input_grad[0] else None
            db = a.transpose(-1, -2) @ grad if ctx.needs_input_grad[1] else None
        return da, db


def tf32_matmul(a: torch.Tensor, b: torch.Tensor, enabled: bool) -> torch.Tensor:
    """a @ b (a (..., M, K), b (..., K, N), fp32, the same batch dims), forward and backward on TF32 tensor cores
    where `enabled` (the caller's data was 16-bit: TF32 keeps its bits) and a is on CUDA; else IEEE fp32 as torch
    runs it. Returns (..., M, N)."""
    if not (enabled and a.is_cuda):
        return a @ b
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"tf32_matmul takes equal batch dims, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _TF32Matmul.apply(a, b)
