"""GGML block quantizers in torch: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and MXFP4, from
export/mxfp4.py, and IQ4_NL / IQ4_XS, from export/iquants.py, through `quantize`).

Each reproduces the bytes of llama.cpp's quantizers (ggml/src/ggml-quants.c): the reference ones,
`quantize_row_<type>_ref`, which `ggml_quantize_chunk` and `llama-quantize` use when no imatrix is given, and, for
all but Q8_0, the importance-weighted ones, `quantize_row_<type>_impl`, used with an imatrix (`*_weighted` here).
The search loops of ggml (`make_qkx2_quants`, `make_qkx3_quants`, `make_qx_quants`, `make_q3_quants`,
`make_qp_quants`; export/kquant_search.py) run vectorised over all (sub-)blocks at once, on the tensor's
device. To get ggml's exact float32
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
from fasttune.export.kquant_search import (_cmax0, _i8, _pack_2bit, _qkx_block, _qkx_block_weighted, _sub_blocks,
                                           _sub_weights, _u8, make_q3_quants, make_qkx2_quants, make_qkx3_quants,
                                           make_qp_quants, make_qx_quants)
from fasttune.export.mxfp4 import quantize_mxfp4_blocks

# ggml type name -> (elements per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
          "MXFP4": (32, 17), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
_CHUNK = 1 << 22  # elements quantized at once (bounds the working memory to a few hundred MB)


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
