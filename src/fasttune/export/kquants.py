"""GGML block quantizers in torch: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each reproduces the bytes of llama.cpp's reference quantizer without an importance matrix (ggml/src/ggml-quants.c:
`quantize_row_<type>_ref`, which `ggml_quantize_chunk` and `llama-quantize` use when no imatrix is given). The
search loops of ggml (`make_qkx2_quants`, `make_qx_quants`, `make_q3_quants`) run vectorised over all (sub-)blocks
at once, on the tensor's device. To get ggml's exact float32 results:
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

QK_K = 256
# ggml type name -> (elements per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
GROUP_MAX_EPS = float(np.float32(1e-15))
_CHUNK = 1 << 22  # elements quantized at once (bounds the working memory to a few hundred MB)


def _c(v, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on `like`'s device (0-dim)."""
    return torch.tensor(np.float32(v), dtype=torch.float32, device=like.device)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the float32 mantissa; int32."""
    return ((v + _c(12582912.0, v)).view(torch.int32) & 0x7FFFFF) - 0x400000


def _seqsum(p: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over dim 0 in order, one float32 add at a time (C's `s += p[i]` from s = 0, or from s = p[0])."""
    acc = p[0].clone() if from_first else torch.zeros_like(p[0]) + p[0]
    for i in range(1, p.shape[0]):
        acc = acc + p[i]
    return acc


def _fp16(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even)."""
    return v.to(torch.float16)


def _bytes16(h: torch.Tensor) -> torch.Tensor:
    """fp16 (n,) -> its little-endian bytes (n, 2) uint8."""
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def _u8(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (modulo 256), as int32."""
    return v & 0xFF


def _i8(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to int8_t (two's complement wrap), as int32."""
    return ((v + 128) & 0xFF) - 128


def _first_absmax(x: torch.Tensor):
    """(amax, max) over dim 0 as ggml's `if (fabsf(x) > amax) { amax = fabsf(x); max = x; }` from 0: the first
    element of largest magnitude, with its sign."""
    a = x.abs()
    a = torch.where(torch.isnan(a), _c(0, a), a)  # NaN never compares greater
    idx = a.argmax(0, keepdim=True)
    amax = a.gather(0, idx)[0]
    return amax, torch.where(amax > 0, x.gather(0, idx)[0], _c(0, x))


def _cmax0(v: torch.Tensor) -> torch.Tensor:
    """ggml's `m = 0; if (v > m) m = v;` over dim 1 (NaN skipped)."""
    v = torch.where(torch.isnan(v), _c(0, v), v)
    return torch.maximum(v.max(1).values, _c(0, v))


def _sub_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """(nb, 256) super-blocks -> (n, nb * 256 / n): column k is sub-block k (element-major, for ordered sums)."""
    return blocks.reshape(-1, n).t().contiguous()


# ----------------------------------------------------------------------------------------------------------- search

def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """ggml's make_qkx2_quants for every column of x (n, B) with weights w (n, B): the affine fit
    x ~ scale * L - the_min with L in [0, nmax], searched over nstep + 1 candidate scales.
    Returns (scale (B,) f32, the_min (B,) f32, L (n, B) int32)."""
    mn = torch.minimum(x.min(0).values, _c(0, x))  # `if (min > 0) min = 0`
    mx = x.max(0).values
    sum_w = _seqsum(w, from_first=True)
    sum_x = _seqsum(w * x, from_first=True)
    flat = mx == mn
    rng = mx - mn
    iscale = _c(nmax, x) / rng
    scale = _c(1, x) / iscale
    L = nearest_int(iscale * (x - mn)).clamp(0, nmax)

    def error(s, m, q):
        diff = s * q.float() + m - x
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum(w * diff)

    best = error(scale, mn, L)
    the_min = mn  # ggml updates `min` with each better fit, and later candidates are taken relative to it
    f = np.float32
    for i in range(nstep + 1):
        iscale = _c(f(f(rmin) + f(rdelta) * f(i)) + f(nmax), x) / (mx - the_min)
        laux = nearest_int(iscale * (x - the_min)).clamp(0, nmax)
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


def make_qx_quants(x, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 and no importance weights (w = x*x), for every column of x (n, B):
    symmetric x ~ scale * (L - nmax), L in [0, 2 nmax), the best of 19 candidate scales.
    Returns (scale (B,) f32, L (n, B) int32)."""
    amax, mx = _first_absmax(x)
    zero = amax < _c(GROUP_MAX_EPS, x)
    w = x * x
    wx = w * x
    f = np.float32

    def fit(iscale):
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


def _u8cat(parts):
    return torch.cat([p.to(torch.uint8) for p in parts], 1)


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


def quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q6_K_ref: (nb, 256) float32 -> (nb, 210) uint8 blocks (ql[128], qh[64], scales[16] int8, d)."""
    nb = blocks.shape[0]
    x = _sub_blocks(blocks, 16)
    scales, L = make_qx_quants(x, 32)
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
              "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(t: torch.Tensor, qtype: str) -> np.ndarray:
    """Quantize a tensor to a GGML block type, bytes equal to ggml's `ggml_quantize_chunk` without imatrix.

    t: any float tensor whose last dimension (the GGUF row, ggml's ne[0]) is a multiple of the type's block size
    (256 for the K types, 32 for the others); it is converted to float32 and quantized on its own device, in
    chunks of rows. qtype: a GGML type name, one of BLOCKS ("Q4_K", "Q6_K", ...). Returns a uint8 numpy array
    (rows, row bytes) where rows is the product of the leading dimensions, as gguf's GGUFWriter.add_tensor takes
    with raw_dtype. Raises ValueError for an unknown type or a row that does not divide into blocks."""
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
    fn = QUANTIZERS[qtype]
    for r in range(0, rows, step):
        chunk = flat[r:r + step].to(torch.float32).reshape(-1, block)
        out[r:r + step] = fn(chunk).reshape(-1, cols // block * size)
    return out.cpu().numpy()
