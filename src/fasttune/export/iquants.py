"""GGML's 4-bit non-linear quantizers in torch: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256 with 6-bit
sub-block scales), bytes equal to llama.cpp's `quantize_iq4_nl` / `quantize_iq4_xs` (ggml/src/ggml-quants.c,
`quantize_row_iq4_nl_impl` with ntry = 7), which `ggml_quantize_chunk` and `llama-quantize` run, with or without
an importance matrix.

Each 32-value (sub-)block stores 4-bit indices into ggml's `kvalues_iq4nl` (16 levels from -127 to 113) times a
scale. The scale search (per sub-block, vectorised over all of them): weights x^2 (with an imatrix qw:
qw * sqrt(sigma2 + x^2), sigma2 = 2/S * sum of x^2 over the super-block of S values); a first scale max/127 and 15
more, (itry - 127)/max for itry in -7..7, each scored by sumqx^2 / sumq2 of the weighted least-squares fit, the
best kept. IQ4_NL stores the fp16 scale; IQ4_XS stores d = -max_scale/32 in fp16 and each sub-block's scale as
round(scale/d) in [-32, 31] (6 bits), then re-quantizes each sub-block with d * l. The exactness rules are
export/kquants.py's (sums in ggml's order, float32 constants, true divisions, ggml's nearest_int); the nearest
level is counted against the midpoints of adjacent levels, which equals ggml's binary search for every finite
value (a NaN maps to level 15, as there).

Block layouts (ggml-common.h, little-endian): block_iq4_nl = fp16 d, 16 bytes of nibbles (value j in the low
nibble of byte j, value j + 16 in the high one); block_iq4_xs = fp16 d, uint16 scales_h (2 high bits per
sub-block), uint8 scales_l[4] (low 4 bits, even sub-blocks in the low nibble), then each sub-block's 16 nibble
bytes as in IQ4_NL.
"""
from __future__ import annotations

import torch

from fasttune.export.ggml_rounding import (GROUP_MAX_EPS, _bytes16, _c, _first_absmax, _fp16, _seqsum, _sqrtf,
                                          _u8cat, nearest_int)

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7: 15 scales besides the first


def best_index(x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8(16, kvalues_iq4nl, x) elementwise: the nearest level (ties to the upper one), by
    counting the level midpoints x is at or above (2x against the sums of adjacent levels, all exact); int64."""
    mids = torch.tensor([a + b for a, b in zip(KVALUES, KVALUES[1:])], dtype=torch.float32, device=x.device)
    idx = torch.bucketize(x + x, mids, right=True)  # the number of midpoints <= 2x
    return torch.where(torch.isnan(x), 15, idx)


def _sums(xt: torch.Tensor, wt: torch.Tensor, inv: torch.Tensor):
    """(sumqx, sumq2) of the levels best_index(inv * x): xt, wt (32, n) element-major, inv (n,); C's
    `sumqx += w*q*x; sumq2 += w*q*q` in element order."""
    levels = torch.tensor(KVALUES, dtype=torch.float32, device=xt.device)
    q = levels[best_index(inv * xt)]
    wq = wt * q
    return _seqsum(wq * xt), _seqsum(wq * q)  # the products at once (each rounded as C rounds it), sums in order


def _scales(x: torch.Tensor, qw: torch.Tensor | None, super_size: int) -> torch.Tensor:
    """The float32 scale of each 32-value sub-block (the ntry = 7 search): x (nb, super_size) float32, qw the same
    shape or None. Returns (nb, super_size / 32); 0 for sub-blocks whose largest magnitude is below 1e-15."""
    nb = x.shape[0]
    xt = x.reshape(-1, 32).t().contiguous()  # (32, sub-blocks)
    if qw is None:
        wt = xt * xt
    else:
        sigma2 = (_seqsum((x * x).t()) * _c(2.0 / super_size, x)).repeat_interleave(super_size // 32)
        wt = qw.reshape(-1, 32).t() * _sqrtf(sigma2 + xt * xt)
    amax, mx = _first_absmax(xt)
    d = -mx / _c(KVALUES[0], x)
    sqx, sq2 = _sums(xt, wt, _c(1, x) / d)
    d = torch.where(sq2 > 0, sqx / sq2, _c(0, x))
    best = d * sqx
    for itry in range(-NTRY, NTRY + 1):
        sqx, sq2 = _sums(xt, wt, _c(itry + KVALUES[0], x) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        new = sqx / sq2
        d = torch.where(better, new, d)
        best = torch.where(better, new * sqx, best)
    d = torch.where(amax < _c(GROUP_MAX_EPS, x), _c(0, x), d)
    return d.reshape(nb, super_size // 32)


def _nibbles(levels: torch.Tensor) -> torch.Tensor:
    """(n, 32k) level indices -> (n, 16k) uint8: per 32 values, byte j = level j | level j+16 << 4."""
    lv = levels.reshape(levels.shape[0], -1, 2, 16)
    return (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(levels.shape[0], -1).to(torch.int32)


def _inv_or_zero(v: torch.Tensor) -> torch.Tensor:
    """C's `v ? 1/v : 0` (a NaN is true)."""
    return torch.where(v != 0, _c(1, v) / v, _c(0, v))


def quantize_iq4_nl(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_iq4_nl: (nb, 32) float32 (and optional importance weights, same shape) -> (nb, 18) uint8."""
    d = _scales(blocks, qw, 32)[:, 0]
    levels = best_index(_inv_or_zero(d)[:, None] * blocks)  # the float32 scale, not its fp16 rounding
    return _u8cat([_bytes16(_fp16(d)), _nibbles(levels)])


def quantize_iq4_xs(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_iq4_xs: (nb, 256) float32 (and optional importance weights, same shape) -> (nb, 136) uint8."""
    s = _scales(blocks, qw, 256)  # (nb, 8)
    max_scale = _first_absmax(s.t())[1]  # the first sub-block of largest |scale|, with its sign
    d = -max_scale / _c(32, s)  # an all-zero super-block gives -0.0: fp16 0x8000, as ggml writes it
    l = nearest_int(_inv_or_zero(d)[:, None] * s).clamp(-32, 31)  # noqa: E741
    dl = d[:, None] * l.to(torch.float32)
    levels = best_index(_inv_or_zero(dl)[:, :, None] * blocks.reshape(-1, 8, 32)).reshape(-1, 256)
    ls = l + 32
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = torch.zeros_like(ls[:, 0])
    for ib in range(8):
        scales_h = scales_h | ((ls[:, ib] >> 4) << (2 * ib))
    return _u8cat([_bytes16(_fp16(d)), scales_h[:, None] & 0xFF, scales_h[:, None] >> 8, scales_l,
                   _nibbles(levels)])
