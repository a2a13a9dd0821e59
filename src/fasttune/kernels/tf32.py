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
