"""ggml's float32 arithmetic conventions as torch helpers, shared by the block quantizers (export/kquants.py,
export/iquants.py): float32 constants on a tensor's device, ggml's nearest_int, C's sqrtf, fp16 rounding and the
little-endian byte packing of ggml's block structs (ggml/src/ggml-quants.c, ggml-common.h)."""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS: blocks whose largest magnitude is below it are zero


def _c(v, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on `like`'s device (0-dim)."""
    return torch.tensor(np.float32(v), dtype=torch.float32, device=like.device)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the float32 mantissa; int32."""
    return ((v + _c(12582912.0, v)).view(torch.int32) & 0x7FFFFF) - 0x400000


def _fp16(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even)."""
    return v.to(torch.float16)


def _bytes16(h: torch.Tensor) -> torch.Tensor:
    """fp16 (n,) -> its little-endian bytes (n, 2) uint8."""
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def _sqrtf(v):
    """C's sqrtf (correctly rounded), through float64."""
    return torch.sqrt(v.double()).float()


def _u8cat(parts):
    """Columns of small ints (each (n, k)) -> one (n, sum of k) uint8 tensor: a block struct's bytes."""
    return torch.cat([p.to(torch.uint8) for p in parts], 1)
