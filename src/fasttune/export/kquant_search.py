"""ggml's scale and level searches for the k-quants and the legacy block types, vectorised over all (sub-)blocks:
`make_qkx2_quants`, `make_qkx3_quants`, `make_qx_quants`, `make_qp_quants` and `make_q3_quants` of
ggml/src/ggml-quants.c, the 6-bit scale packing of the K types (`_pack_scales_k4` / `_unpack_scales_k4`, ggml's
get_scale_min_k4), and the per-super-block bodies that Q4_K / Q5_K share, plain and importance-weighted. The block
formats that use them, and the float32 conventions they keep to reproduce ggml's bytes, are in export/kquants.py.
"""
from __future__ import annotations

import numpy as np
import torch

from fasttune.export.ggml_rounding import GROUP_MAX_EPS, _c, _first_absmax, _fp16, _seqsum, _sqrtf, nearest_int

QK_K = 256  # values per k-quant super-block


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
