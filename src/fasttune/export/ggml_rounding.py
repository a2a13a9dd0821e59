"""ggml's float32 arithmetic conventions as torch helpers, shared by the block quantizers (export/kquants.py,
export/iquants.py): float32 constants on a tensor's device, ggml's nearest_int, C's sqrtf, sums in C's order, the
first element of largest magnitude, fp16 rounding and the little-endian byte packing of ggml's block structs
(ggml/src/ggml-quants.c, ggml-common.h)."""
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


def _seqsum(p: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over dim 0 in order, one float32 add at a time (C's `s += p[i]` from s = 0, or from s = p[0])."""
    if p.device.type == "cpu" and p.dtype == torch.float32 and p.dim() > 1 and not p.requires_grad:
        # the same adds in numpy, in place: ~1 us each instead of a torch op's ~8 (the quantizers call this ~20,000
        # times per model). Not np.sum/np.add.reduce: those may sum in another order (pairwise).
        a = p.numpy()
        acc = a[0].copy() if from_first else np.zeros_like(a[0]) + a[0]
        with np.errstate(all="ignore"):  # overflow to inf and inf - inf = NaN are expected, as in C
            for i in range(1, a.shape[0]):
                acc += a[i]
        return torch.from_numpy(acc)
    acc = p[0].clone() if from_first else torch.zeros_like(p[0]) + p[0]
    for i in range(1, p.shape[0]):
        acc = acc + p[i]
    return acc


def _first_absmax(x: torch.Tensor):
    """(amax, max) over dim 0 as ggml's `if (fabsf(x) > amax) { amax = fabsf(x); max = x; }` from 0: the first
    element of largest magnitude, with its sign."""
    a = x.abs()
    a = torch.where(torch.isnan(a), _c(0, a), a)  # NaN never compares greater
    idx = a.argmax(0, keepdim=True)
    amax = a.gather(0, idx)[0]
    return amax, torch.where(amax > 0, x.gather(0, idx)[0], _c(0, x))
