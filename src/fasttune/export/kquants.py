"""GGML block quantizers in torch: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and MXFP4, from
export/mxfp4.py, and IQ4_NL / IQ4_XS, from export/iquants.py, through `quantize`).

Each reproduces the bytes of llama.cpp's quantizers (ggml/src/ggml-quants.c): the reference ones,
`quantize_row_<type>_ref`, which `ggml_quantize_chunk` and `llama-quantize` use when no imatrix is given, and, for
all but Q8_0, the importance-weighted ones, `quantize_row_<type>_impl`, used with an imatrix (`*_weighted` here).
The search loops of ggml (`make_qkx2_quants`, `make_qkx3_quants`, `make_qx_quants`, `make_q3_quants`,
`make_qp_quants`) run vectorised over all (sub-)blocks at once, on the tensor's device. To get ggml's exact float32
results:
- every sum over a block's elements is accumulated in ggml's order (element 0, 1, 2, ...), one add at a time;
- products keep C's left-to-right order (`w*l*x` is `(w*l)*x`), constants are float32, and divisions by a
  constant are true divisions (0-dim device tensors, not Python scalars, so CUDA does not use a reciprocal);
  square roots are taken in float64 and rounded (torch's float32 sqrt on CPU can be one ulp off);
- `nearest_int` is ggml's bit trick (add 1.5 * 2**23, read the mantissa), C's integer conversions (uint8/int8
  wrap-around, truncation toward zero, `roundf`) are reproduced, and fp16 scales round to nearest even.
The block layouts are ggml's `block_q4_K` etc. (ggml-common.h), little-endian.
"""
from __future__ import annotations

import numpy as np
import torch

from fasttune.export import iquants
from fasttune.export.ggml_rounding import (GROUP_MAX_EPS, _bytes16, _c, _first_absmax, _fp16, _seqsum, _sqrtf,
                                          _u8cat, nearest_int)
from fasttune.export.mxfp4 import quantize_mxfp4_blocks

QK_K = 256
# ggml type name -> (elements per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
          "MXFP4": (32, 17), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
_CHUNK = 1 << 22  # elements quantized at once (bounds the working memory to a few hundred MB)


def _u8(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (modulo 256), as int32."""
    return v & 0xFF


def _i8(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to int8_t (two's complement wrap), as int32."""
    return ((v + 128) & 0xFF) - 128


def _cmax0(v: torch.Tensor) -> torch.Tensor:
    """ggml's `m = 0; if (v > m) m = v;` over dim 1 (NaN skipped)."""
    v = torch.where(torch.isnan(v), _c(0, v), v)
    return torch.maximum(v.max(1).values, _c(0, v))


def _sub_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """(nb, 256) super-blocks -> (n, nb * 256 / n): column k is sub-block k (element-major, for ordered sums)."""
    return blocks.reshape(-1, n).t().contiguous()


# ----------------------------------------------------------------------------------------------------------- search

def _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, guarded):
    """Body of ggml's make_qkx2_quants (guarded=False) and make_qkx3_quants (guarded=True: inside the search a
    candidate level is `v > 0 ? nearest_int(MIN(v, nmax)) : 0`, which is the clamp of make_qkx2_quants for every
    finite v, and 0 or nmax where that would read a NaN or an overflowed integer)."""
    low = x.min(0).values
    first = x.gather(0, (x == low).to(torch.uint8).argmax(0, keepdim=True))[0]  # C keeps the first: -0.0 vs 0.0
    mn = torch.where(first > 0, _c(0, x), first)  # `if (min > 0) min = 0`
    mx = x.max(0).values
    sum_w = _seqsum(w, from_first=True)
    sum_x = _seqsum(w * x, from_first=True)
    flat = mx == mn
    rng = mx - mn
    iscale = _c(nmax, x) / rng
    scale = _c(1, x) / iscale
    L = nearest_int(iscale * (x - mn)).clamp(0, nmax)

    def error(s, m, q):
        """ggml's weighted error of levels q (rows, 32) under scale s and min m (rows, 1): sum of w * |d| (use_mad)
        or w * d^2 over each row, in ggml's order."""
        diff = s * q.float() + m - x
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum(w * diff)

    best = error(scale, mn, L)
    the_min = mn  # ggml updates `min` with each better fit, and later candidates are taken relative to it
    f = np.float32
    top = _c(nmax, x)
    for i in range(nstep + 1):
        iscale = _c(f(f(rmin) + f(rdelta) * f(i)) + f(nmax), x) / (mx - the_min)
        v = iscale * (x - the_min)
        if guarded:
            laux = torch.where(v > 0, nearest_int(torch.where(v < top, v, top)), torch.zeros_like(L))
        else:
            laux = nearest_int(v).clamp(0, nmax)
        lf = laux.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, _c(0, x), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, laux)
        upd = (D > 0) & (cur < best)
        L = torch.where(upd, laux, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        the_min = torch.where(upd, this_min, the_min)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, _c(0, x), scale)
    return scale, -torch.where(flat, mn, the_min), L


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """ggml's make_qkx2_quants for every column of x (n, B) with weights w (n, B): the affine fit
    x ~ scale * L - the_min with L in [0, nmax], searched over nstep + 1 candidate scales.
    Returns (scale (B,) f32, the_min (B,) f32, L (n, B) int32)."""
    return _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, guarded=False)


def make_qkx3_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """ggml's make_qkx3_quants (the importance-weighted k-quants' affine search; ggml-quants.c) for every column
    of x (n, B) float32 with weights w (n, B) float32: as make_qkx2_quants, with the search's levels guarded
    against an infinite or NaN candidate. Returns (scale (B,), the_min (B,), L (n, B) int32 in [0, nmax])."""
    return _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, guarded=True)


def make_qx_quants(x, nmax: int, w=None):
    """ggml's make_qx_quants with rmse_type 1 for every column of x (n, B) float32: symmetric x ~ scale * (L - nmax),
    L in [0, 2 nmax), the best of 19 candidate scales by the weighted least-squares fit. w: the weights (n, B)
    (ggml's `quant_weights`), or None for ggml's default w = x*x. Returns (scale (B,) f32, L (n, B) int32)."""
    amax, mx = _first_absmax(x)
    zero = amax < _c(GROUP_MAX_EPS, x)
    w = x * x if w is None else w
    wx = w * x
    f = np.float32

    def fit(iscale):
        """Levels of x at inverse scale iscale (rows, 1), clamped to [-nmax, nmax - 1], with their weighted sums
        sum(w * x * l) and sum(w * l^2) per row (ggml's make_qx_quants)."""
        l = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        lf = l.float()
        return l, _seqsum(wx * lf), _seqsum(w * lf * lf)

    l, sumlx, suml2 = fit(_c(-nmax, x) / mx)
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, _c(0, x))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        l, sumlx, suml2 = fit(_c(-(f(nmax) + f(0.1) * f(i)), x) / mx)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd, l + nmax, L)
        scale = torch.where(upd, sumlx / suml2, scale)
        best = torch.where(upd, scale * sumlx, best)
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, _c(0, x), scale)
    return scale, L


def make_qp_quants(x, nmax: int, w):
    """ggml's make_qp_quants for every column of x (n, B) float32 (non-negative values: the sub-block scales or
    mins of a super-block) with weights w (n, B): x ~ scale * L, L in [0, nmax], the best of 9 candidate scales by
    weighted squared error, then refined element by element (5 passes) for the weighted least-squares scale.
    ggml stores L in uint8 (kept here: a negative level wraps as in C). Returns (scale (B,) f32, L (n, B) int32)."""
    n = x.shape[0]
    mx = _cmax0(x.t())
    zero = mx < _c(GROUP_MAX_EPS, x)
    f = np.float32

    def sse(scale, l):
        """Weighted squared error per row of levels l (rows, n) at scale (rows, 1), in ggml's order."""
        diff = x - scale * l.float()
        return _seqsum(w * diff * diff)

    iscale = _c(nmax, x) / mx
    best = sse(_c(1, x) / iscale, _u8(nearest_int(iscale * x)))
    for i in range(-4, 5):
        if i == 0:
            continue
        iscale_i = _c(f(f(0.1) * f(i)) + f(nmax), x) / mx
        cur = sse(_c(1, x) / iscale_i, torch.clamp(nearest_int(iscale_i * x), max=nmax))
        upd = cur < best
        best = torch.where(upd, cur, best)
        iscale = torch.where(upd, iscale_i, iscale)
    l = torch.clamp(nearest_int(iscale * x), max=nmax)
    lf = l.float()
    wx = w * x
    sumlx, suml2 = _seqsum(wx * lf), _seqsum(w * lf * lf)
    L = [_u8(l[i]) for i in range(n)]
    for _ in range(5):  # ggml stops early when a pass changes nothing; further passes would not either
        for i in range(n):
            li = L[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = torch.clamp(nearest_int(x[i] * sl2 / slx), max=nmax)
            nf = new.float()
            slx2 = slx + wx[i] * nf
            sl2b = sl2 + w[i] * nf * nf
            take = (slx > 0) & (sl2 > 0) & (new != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2b)
            L[i] = torch.where(take, _u8(new), L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl2b, suml2)
    L = torch.stack(L)
    scale = torch.where(suml2 > 0, sumlx / suml2, _c(0, x))
    return torch.where(zero, _c(0, x), scale), torch.where(zero, torch.zeros_like(L), L)


def make_q3_quants(x, nmax: int):
    """ggml's make_q3_quants with do_rmse for every column of x (n, B): symmetric levels in [-nmax, nmax) refined
    element by element (5 passes) for the weighted (x*x) least-squares scale. Returns (scale (B,), L (n, B) int32
    offset by nmax)."""
    amax, mx = _first_absmax(x)
    zero = amax < _c(GROUP_MAX_EPS, x)
    l = nearest_int(_c(-nmax, x) / mx * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = l.float()
    sumlx, suml2 = _seqsum(wx * lf), _seqsum(w * lf * lf)
    L = [l[i] for i in range(x.shape[0])]
    for _ in range(5):  # ggml stops early when a pass changes nothing; further passes would not either
        for i in range(x.shape[0]):
            li = L[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1)
            nf = new.float()
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            take = ((sumlx - wx[i] * li) > 0) & (new != L[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    L = torch.stack(L) + nmax
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(suml2 > 0, sumlx / suml2, _c(0, x))
    return torch.where(zero, _c(0, x), scale), L


# ------------------------------------------------------------------------------------------------------- packing

def _pack_2bit(L):
    """(nb, 256) levels 0..3 -> (nb, 64) bytes: per 128 half, byte l = L[l] | L[l+32]<<2 | L[l+64]<<4 | L[l+96]<<6."""
    L = L.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls, lm):
    """Q4_K/Q5_K: 8 6-bit scales and 8 6-bit mins (nb, 8) -> the 12 packed bytes (ggml's get_scale_min_k4 inverse)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], 1)


# ---------------------------------------------------------------------------------------------- k-quant blocks

def _qkx_block(blocks, nmax, rmin, rdelta, nstep):
    """Shared body of quantize_row_q4_K_ref / quantize_row_q5_K_ref: (d, dmin fp16 (nb,), packed scales (nb, 12),
    levels (nb, 256) in [0, nmax])."""
    nb = blocks.shape[0]
    x = _sub_blocks(blocks, 32)
    sum_x2 = _seqsum(x * x)
    av_x = torch.sqrt((sum_x2 / _c(32, x)).double()).float()  # torch's float32 sqrt is not always correctly rounded
    w = av_x + x.abs()
    scales, mins, L = make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    zero = _c(0, x)
    max_scale, max_min = _cmax0(scales), _cmax0(mins)
    inv_scale = torch.where(max_scale > 0, _c(63, x) / max_scale, zero)
    inv_min = torch.where(max_min > 0, _c(63, x) / max_min, zero)
    ls = _u8(nearest_int(inv_scale[:, None] * scales)).clamp(max=63)
    lm = _u8(nearest_int(inv_min[:, None] * mins)).clamp(max=63)
    d = _fp16(max_scale / _c(63, x))
    dmin = _fp16(max_min / _c(63, x))
    dd = d.float()[:, None] * ls.float()
    dm = dmin.float()[:, None] * lm.float()
    xb = blocks.reshape(nb, 8, 32)
    new = nearest_int((xb + dm[..., None]) / dd[..., None]).clamp(0, nmax)
    L = L.t().reshape(nb, 8, 32)
    L = torch.where((dd != 0)[..., None], new, L).reshape(nb, 256)
    return d, dmin, _pack_scales_k4(ls, lm), L


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_K_ref: (nb, 256) float32 -> (nb, 144) uint8 blocks (d, dmin, scales[12], qs[128])."""
    d, dmin, sc, L = _qkx_block(blocks, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return _u8cat([_bytes16(d), _bytes16(dmin), sc, qs])


def quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_K_ref: (nb, 256) float32 -> (nb, 176) uint8 blocks (d, dmin, scales[12], qh[32], qs[128])."""
    d, dmin, sc, L = _qkx_block(blocks, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hi = (L >> 4) & 1  # (nb, 4, 2, 32): bit 2n of qh[j] for L[64n + j], bit 2n + 1 for L[64n + 32 + j]
    shifts = torch.arange(8, device=L.device, dtype=L.dtype).reshape(1, 4, 2, 1)
    qh = (hi << shifts).sum((1, 2))
    return _u8cat([_bytes16(d), _bytes16(dmin), sc, qh, qs])


def quantize_q6_k(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_row_q6_K_ref: (nb, 256) float32 -> (nb, 210) uint8 blocks (ql[128], qh[64], scales[16] int8, d).
    qw (nb, 256): importance weights for the sub-block fits (quantize_row_q6_K_impl), None for the reference."""
    nb = blocks.shape[0]
    x = _sub_blocks(blocks, 16)
    scales, L = make_qx_quants(x, 32, None if qw is None else _sub_blocks(qw, 16))
    scales = scales.reshape(nb, 16)
    amax, max_scale = _first_absmax(scales.t())
    empty = amax < _c(GROUP_MAX_EPS, x)
    iscale = _c(-128, x) / max_scale
    d = _fp16(_c(1, x) / iscale)
    sc = _i8(nearest_int(iscale[:, None] * scales).clamp(max=127))
    dd = d.float()[:, None] * sc.float()
    new = nearest_int(blocks.reshape(nb, 16, 16) / dd[..., None]).clamp(-32, 31) + 32
    L = L.t().reshape(nb, 16, 16)
    L = torch.where((dd != 0)[..., None], new, L).reshape(nb, 2, 4, 32)
    ql = torch.cat([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], 2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = _u8cat([ql.reshape(nb, 128), qh.reshape(nb, 64), _u8(sc), _bytes16(d)])
    return torch.where(empty[:, None], torch.zeros_like(out), out)


def quantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_ref: (nb, 256) float32 -> (nb, 110) uint8 blocks (hmask[32], qs[64], scales[12], d)."""
    nb = blocks.shape[0]
    x = _sub_blocks(blocks, 16)
    scales, L = make_q3_quants(x, 4)
    scales = scales.reshape(nb, 16)
    _, max_scale = _first_absmax(scales.t())
    some = max_scale != 0
    iscale = _c(-32, x) / max_scale
    ls = torch.where(some[:, None], _i8(nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32,
                     torch.zeros_like(scales, dtype=torch.int32))
    d = _fp16(torch.where(some, _c(1, x) / iscale, _c(0, x)))
    return _pack_q3_k(blocks, ls, d, L)


def _pack_q3_k(blocks, ls, d, L):
    """The end of quantize_row_q3_K_ref/_impl: 6-bit scale levels ls (nb, 16) in [0, 64), fp16 d (nb,) and the
    sub-block fits' levels L (16, nb * 16) in [0, 8) -> (nb, 110) uint8, values re-fitted to the stored scales."""
    nb = blocks.shape[0]
    packed = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
                        ((ls >> 4).reshape(nb, 4, 4) << torch.tensor([0, 2, 4, 6], device=ls.device)[:, None])
                        .sum(1)], 1)
    dd = d.float()[:, None] * (ls - 32).float()
    new = nearest_int(blocks.reshape(nb, 16, 16) / dd[..., None]).clamp(-4, 3) + 4
    L = L.t().reshape(nb, 16, 16)
    L = torch.where((dd != 0)[..., None], new, L).reshape(nb, 256)
    high = (L > 3).long().reshape(nb, 8, 32)  # element 32k + m sets bit k of hmask[m]
    hmask = (high << torch.arange(8, device=L.device)[:, None]).sum(1)
    L = torch.where(L > 3, L - 4, L)
    return _u8cat([hmask, _pack_2bit(L), packed, _bytes16(d)])


def quantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_ref: (nb, 256) float32 -> (nb, 84) uint8 blocks (scales[16], qs[64], d, dmin)."""
    nb = blocks.shape[0]
    x = _sub_blocks(blocks, 16)
    scales, mins, L = make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    zero = _c(0, x)
    max_scale, max_min = _cmax0(scales), _cmax0(mins)
    q4 = _c(15, x)
    ls = torch.where((max_scale > 0)[:, None], _u8(nearest_int(q4 / max_scale[:, None] * scales)),
                     torch.zeros_like(scales, dtype=torch.int32))
    d = _fp16(torch.where(max_scale > 0, max_scale / q4, zero))
    sc = torch.where((max_min > 0)[:, None], _u8(ls | (nearest_int(q4 / max_min[:, None] * mins) << 4)), ls)
    dmin = _fp16(torch.where(max_min > 0, max_min / q4, zero))
    dd = d.float()[:, None] * (sc & 0xF).float()
    dm = dmin.float()[:, None] * (sc >> 4).float()
    new = nearest_int((blocks.reshape(nb, 16, 16) + dm[..., None]) / dd[..., None]).clamp(0, 3)
    L = L.t().reshape(nb, 16, 16)
    L = torch.where((dd != 0)[..., None], new, L).reshape(nb, 256)
    return _u8cat([sc, _pack_2bit(L), _bytes16(d), _bytes16(dmin)])


# -------------------------------------------------------------------- importance-weighted (imatrix) quantizers
# ggml's quantize_<type>(src, dst, nrow, n_per_row, quant_weights) with quant_weights given: quantize_row_<type>_impl
# on each row. The weights of element j of a row are quant_weights[j] * sqrt(sigma2 + x_j^2), sigma2 a mean square
# of the row (Q4_0/Q4_1/Q5_0/Q5_1) or of the super-block (the K types; Q6_K uses quant_weights alone).


def _block_sigma2(blocks, factor: int):
    """factor * (sum of x^2 over the 256 values, in order) / 256 per super-block (nb,)."""
    return _c(factor, blocks) * _seqsum((blocks * blocks).t()) / _c(QK_K, blocks)


def _sub_weights(blocks, qw, n: int, factor: int):
    """(x (n, nb*256/n), weights (n, nb*256/n)) for sub-blocks of n: qw * sqrtf(sigma2 + x^2)."""
    x = _sub_blocks(blocks, n)
    sigma2 = _block_sigma2(blocks, factor).repeat_interleave(QK_K // n)
    return x, _sub_blocks(qw, n) * _sqrtf(sigma2 + x * x)


def _unpack_scales_k4(packed):
    """The inverse of _pack_scales_k4 as ggml's get_scale_min_k4 reads it: (nb, 12) -> (sc, m) (nb, 8) int32."""
    q = packed.to(torch.int32)
    sc = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def _qkx_block_weighted(blocks, qw, nmax: int, cap: bool):
    """Shared body of quantize_row_q4_K_impl / quantize_row_q5_K_impl with weights: (d, dmin fp16 (nb,), packed
    scales (nb, 12) uint8, levels (nb, 256)). cap: Q5_K's `MIN(63, ls)` on the uint8 scale levels."""
    nb = blocks.shape[0]
    x, w = _sub_weights(blocks, qw, 32, 2)
    sw = _seqsum(w).reshape(nb, 8)
    scales, mins, L = make_qkx3_quants(x, w, nmax, -0.9, 0.05, 36, False)
    d_block, ls = make_qp_quants(scales.reshape(nb, 8).t(), 63, sw.t())
    m_block, lm = make_qp_quants(mins.reshape(nb, 8).t(), 63, sw.t())
    ls, lm = ls.t(), lm.t()
    if cap:
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = _u8(_pack_scales_k4(ls, lm))
    d, dmin = _fp16(d_block), _fp16(m_block)
    sc, m = _unpack_scales_k4(packed)
    dd = d.float()[:, None] * sc.float()
    dm = dmin.float()[:, None] * m.float()
    new = nearest_int((blocks.reshape(nb, 8, 32) + dm[..., None]) / dd[..., None]).clamp(0, nmax)
    L = L.t().reshape(nb, 8, 32)
    L = torch.where((dd != 0)[..., None], new, L).reshape(nb, 256)
    return d, dmin, packed, L


def quantize_q4_k_weighted(blocks: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_K_impl with quant_weights: blocks (nb, 256) float32, qw (nb, 256) float32 (each block's
    importance weights) -> (nb, 144) uint8 blocks, the layout of quantize_q4_k."""
    d, dmin, sc, L = _qkx_block_weighted(blocks, qw, 15, cap=False)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return _u8cat([_bytes16(d), _bytes16(dmin), sc, qs])


def quantize_q5_k_weighted(blocks: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_K_impl with quant_weights: blocks (nb, 256), qw (nb, 256) float32 -> (nb, 176) uint8."""
    d, dmin, sc, L = _qkx_block_weighted(blocks, qw, 31, cap=True)
    L = L.reshape(-1, 4, 2, 32)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hi = (L >> 4) & 1
    shifts = torch.arange(8, device=L.device, dtype=L.dtype).reshape(1, 4, 2, 1)
    qh = (hi << shifts).sum((1, 2))
    return _u8cat([_bytes16(d), _bytes16(dmin), sc, qh, qs])


def quantize_q6_k_weighted(blocks: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q6_K_impl with quant_weights: the reference Q6_K with the sub-block fits weighted by qw itself
    (ggml passes quant_weights straight to make_qx_quants). blocks, qw (nb, 256) -> (nb, 210) uint8."""
    return quantize_q6_k(blocks, qw)


def quantize_q3_k_weighted(blocks: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_impl with quant_weights: weighted make_qx_quants per 16 values, and the 16 scales
    themselves fitted by make_qx_quants (nmax 32) weighted by their sub-blocks' weight sums. blocks, qw (nb, 256)
    -> (nb, 110) uint8, the layout of quantize_q3_k."""
    nb = blocks.shape[0]
    x, w = _sub_weights(blocks, qw, 16, 2)
    sw = _seqsum(w).reshape(nb, 16)
    scales, L = make_qx_quants(x, 4, w)
    d_block, ls = make_qx_quants(scales.reshape(nb, 16).t(), 32, sw.t())
    return _pack_q3_k(blocks, ls.t(), _fp16(d_block), L)


def quantize_q2_k_weighted(blocks: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_impl: make_qkx3_quants per 16 values (weights qw * sqrt(mean x^2 + x^2)), the 16 scales
    and the 16 mins fitted by make_qp_quants (nmax 15) weighted by the sub-blocks' weight sums. blocks, qw (nb, 256)
    float32 -> (nb, 84) uint8, the layout of quantize_q2_k."""
    nb = blocks.shape[0]
    x, w = _sub_weights(blocks, qw, 16, 1)
    sw = _seqsum(w).reshape(nb, 16).t()
    scales, mins, L = make_qkx3_quants(x, w, 3, -0.9, 0.05, 36, False)
    dm, ls = make_qp_quants(scales.reshape(nb, 16).t(), 15, sw)
    mm, lm = make_qp_quants(mins.reshape(nb, 16).t(), 15, sw)
    sc = _u8(ls.t() | (lm.t() << 4))
    d, dmin = _fp16(dm), _fp16(mm)
    dd = d.float()[:, None] * (sc & 0xF).float()
    dmv = dmin.float()[:, None] * (sc >> 4).float()
    new = nearest_int((blocks.reshape(nb, 16, 16) + dmv[..., None]) / dd[..., None]).clamp(0, 3)
    L = L.t().reshape(nb, 16, 16)
    L = torch.where((dd != 0)[..., None], new, L).reshape(nb, 256)
    return _u8cat([sc, _pack_2bit(L), _bytes16(d), _bytes16(dmin)])


def _row_blocks_weighted(rows, qw):
    """32-value blocks of whole rows (R, C) -> (x (32, R*C/32), weights (32, R*C/32)): qw * sqrtf(sigma2 + x^2) with
    sigma2 = (sum of the row's x^2, in order) / C, as quantize_row_q4_0_impl etc. compute it."""
    R, C = rows.shape
    sigma2 = _seqsum((rows * rows).t()) / _c(C, rows)
    x = rows.reshape(-1, 32).t()
    q = qw.reshape(1, C // 32, 32).expand(R, -1, -1).reshape(-1, 32).t()
    return x, q * _sqrtf(sigma2.repeat_interleave(C // 32) + x * x)


def quantize_q4_0_weighted(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_impl: rows (R, C) float32, qw (C,) float32 -> (R * C / 32, 18) uint8; the scale is
    make_qx_quants' weighted fit (nmax 8) instead of the reference's max / -8."""
    x, w = _row_blocks_weighted(rows, qw)
    d, L = make_qx_quants(x, 8, w)
    return _u8cat([_bytes16(_fp16(d)), _nibbles(L.t())])


def quantize_q5_0_weighted(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_0_impl: rows (R, C), qw (C,) float32 -> (R * C / 32, 22) uint8 (make_qx_quants, nmax 16)."""
    x, w = _row_blocks_weighted(rows, qw)
    d, L = make_qx_quants(x, 16, w)
    L = L.t()
    return _u8cat([_bytes16(_fp16(d)), _qh5(L), _nibbles(L)])


def quantize_q4_1_weighted(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_1_impl: rows (R, C), qw (C,) float32 -> (R * C / 32, 20) uint8 (make_qkx3_quants, nmax 15)."""
    x, w = _row_blocks_weighted(rows, qw)
    d, the_min, L = make_qkx3_quants(x, w, 15, -0.9, 0.05, 36, False)
    return _u8cat([_bytes16(_fp16(d)), _bytes16(_fp16(-the_min)), _nibbles(L.t())])


def quantize_q5_1_weighted(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_1_impl: rows (R, C), qw (C,) float32 -> (R * C / 32, 24) uint8 (make_qkx3_quants, nmax 31)."""
    x, w = _row_blocks_weighted(rows, qw)
    d, the_min, L = make_qkx3_quants(x, w, 31, -0.9, 0.05, 36, False)
    L = L.t()
    return _u8cat([_bytes16(_fp16(d)), _bytes16(_fp16(-the_min)), _qh5(L), _nibbles(L)])


# ------------------------------------------------------------------------------------------- 32-element blocks

def _trunc_int(v):
    """C's float -> integer conversion (toward zero), int32."""
    return torch.trunc(v).to(torch.int32)


def _inv(d):
    """`id = d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, _c(1, d) / d, _c(0, d))


def _nibbles(q):
    """(nb, 32) 4-bit values -> (nb, 16) bytes: q[j] | q[j + 16] << 4."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _qh5(q):
    """Bit 4 of each of the 32 values -> the little-endian uint32 qh (nb, 4) bytes."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8, device=q.device, dtype=q.dtype)).sum(2)


def quantize_q4_0(blocks):
    """quantize_row_q4_0_ref: (nb, 32) float32 -> (nb, 18) uint8 (d, qs[16])."""
    _, mx = _first_absmax(blocks.t())
    d = mx / _c(-8, blocks)
    q = _trunc_int(blocks * _inv(d)[:, None] + _c(8.5, blocks)).clamp(max=15)
    return _u8cat([_bytes16(_fp16(d)), _nibbles(q)])


def quantize_q4_1(blocks):
    """quantize_row_q4_1_ref: (nb, 32) float32 -> (nb, 20) uint8 (d, m, qs[16])."""
    mn, mx = blocks.min(1).values, blocks.max(1).values
    d = (mx - mn) / _c(15, blocks)
    q = _trunc_int((blocks - mn[:, None]) * _inv(d)[:, None] + _c(0.5, blocks)).clamp(max=15)
    return _u8cat([_bytes16(_fp16(d)), _bytes16(_fp16(mn)), _nibbles(q)])


def quantize_q5_0(blocks):
    """quantize_row_q5_0_ref: (nb, 32) float32 -> (nb, 22) uint8 (d, qh[4], qs[16])."""
    _, mx = _first_absmax(blocks.t())
    d = mx / _c(-16, blocks)
    q = _trunc_int(blocks * _inv(d)[:, None] + _c(16.5, blocks)).clamp(max=31)
    return _u8cat([_bytes16(_fp16(d)), _qh5(q), _nibbles(q)])


def quantize_q5_1(blocks):
    """quantize_row_q5_1_ref: (nb, 32) float32 -> (nb, 24) uint8 (d, m, qh[4], qs[16])."""
    mn, mx = blocks.min(1).values, blocks.max(1).values
    d = (mx - mn) / _c(31, blocks)
    q = _u8(_trunc_int((blocks - mn[:, None]) * _inv(d)[:, None] + _c(0.5, blocks)))
    return _u8cat([_bytes16(_fp16(d)), _bytes16(_fp16(mn)), _qh5(q), _nibbles(q)])


def quantize_q8_0(blocks):
    """quantize_row_q8_0_ref: (nb, 32) float32 -> (nb, 34) uint8 (d, qs[32] int8); roundf rounds half away
    from zero."""
    d = blocks.abs().max(1).values / _c(127, blocks)
    v = blocks * _inv(d)[:, None]
    t = torch.trunc(v)
    q = t + torch.where((v - t).abs() >= _c(0.5, v), torch.sign(v), _c(0, v))
    return _u8cat([_bytes16(_fp16(d)), _u8(q.to(torch.int32))])


QUANTIZERS = {"Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1, "Q5_0": quantize_q5_0, "Q5_1": quantize_q5_1,
              "Q8_0": quantize_q8_0, "Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k,
              "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k, "MXFP4": quantize_mxfp4_blocks,
              "IQ4_NL": iquants.quantize_iq4_nl, "IQ4_XS": iquants.quantize_iq4_xs}


# Types whose quantizer uses an importance matrix: K and IQ4 types take (blocks, block weights), the 32-blocks whole
# rows (their weights use the row's mean square). Q8_0 ignores it, as in ggml.
WEIGHTED_BLOCKS = {"Q2_K": quantize_q2_k_weighted, "Q3_K": quantize_q3_k_weighted, "Q4_K": quantize_q4_k_weighted,
                   "Q5_K": quantize_q5_k_weighted, "Q6_K": quantize_q6_k_weighted,
                   "IQ4_NL": iquants.quantize_iq4_nl, "IQ4_XS": iquants.quantize_iq4_xs}
WEIGHTED_ROWS = {"Q4_0": quantize_q4_0_weighted, "Q4_1": quantize_q4_1_weighted, "Q5_0": quantize_q5_0_weighted,
                 "Q5_1": quantize_q5_1_weighted}
USES_IMATRIX = frozenset(WEIGHTED_BLOCKS) | frozenset(WEIGHTED_ROWS)


def quantize(t: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """Quantize a tensor to a GGML block type, bytes equal to ggml's `ggml_quantize_chunk`.

    t: any float tensor whose last dimension (the GGUF row, ggml's ne[0]) is a multiple of the type's block size
    (256 for the K types, 32 for the others); it is converted to float32 and quantized on its own device, in
    chunks of rows. qtype: a GGML type name, one of BLOCKS ("Q4_K", "Q6_K", ...). imatrix: None (ggml's reference
    quantizers, `quantize_row_<type>_ref`), or the importance of each column, shape (t.shape[-1],), finite and
    >= 0 (llama.cpp's imatrix: the mean square of that input feature); the types in USES_IMATRIX then run ggml's
    weighted search (`quantize_row_<type>_impl`), Q8_0 and MXFP4 ignore it as ggml does. Returns a uint8 numpy array
    (rows, row bytes) where rows is the product of the leading dimensions, as gguf's GGUFWriter.add_tensor takes
    with raw_dtype. Raises ValueError for an unknown type, a row that does not divide into blocks, or an imatrix
    of the wrong length or with negative or non-finite values."""
    if qtype not in QUANTIZERS:
        raise ValueError(f"no quantizer for GGML type {qtype!r}; known: {', '.join(QUANTIZERS)}")
    block, size = BLOCKS[qtype]
    cols = t.shape[-1]
    if cols % block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {block} values; this tensor's rows have {cols}")
    rows = t.numel() // cols
    flat = t.detach().reshape(rows, cols)
    out = torch.empty(rows, cols // block * size, dtype=torch.uint8, device=t.device)
    step = max(1, _CHUNK // cols)
    qw = None
    if imatrix is not None and qtype in USES_IMATRIX:
        qw = torch.as_tensor(imatrix).detach().to(device=t.device, dtype=torch.float32)
        if qw.shape != (cols,):
            raise ValueError(f"the importance matrix of a tensor with rows of {cols} values needs {cols} values; "
                             f"got shape {tuple(qw.shape)}")
        if not bool(torch.isfinite(qw).all()) or bool((qw < 0).any()):
            raise ValueError("the importance matrix has negative or non-finite values")
    for r in range(0, rows, step):
        chunk = flat[r:r + step].to(torch.float32)
        if qw is None:
            q = QUANTIZERS[qtype](chunk.reshape(-1, block))
        elif qtype in WEIGHTED_ROWS:
            q = WEIGHTED_ROWS[qtype](chunk, qw)
        else:
            q = WEIGHTED_BLOCKS[qtype](chunk.reshape(-1, block), qw.reshape(1, -1).expand(chunk.shape[0], -1)
                                       .reshape(-1, block))
        out[r:r + step] = q.reshape(-1, cols // block * size)
    return out.cpu().numpy()
