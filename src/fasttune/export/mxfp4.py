"""GGML's MXFP4 blocks in torch: the quantizer (bytes equal ggml's `quantize_row_mxfp4_ref`) and its dequantizer.

This is llama.cpp's on-disk type GGML_TYPE_MXFP4 (gguf's GGMLQuantizationType.MXFP4), the type of the expert tensors
in llama.cpp's gpt-oss files; the checkpoint format gpt-oss is published in is read by quant/mxfp4.py. Layout
(ggml-common.h `block_mxfp4`, 17 bytes per 32 values): one E8M0 scale byte `e`, then 16 bytes `qs` where
`qs[j]` holds value j in its low nibble and value j + 16 in its high nibble (the halves of the block, as Q4_0 packs
them; the published checkpoints put neighbouring values in one byte instead). A nibble indexes ggml's
`kvalues_mxfp4` = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12} (twice the E2M1 values) and the scale
is taken as half of 2^(e - 127) (`GGML_E8M0_TO_FP32_HALF`: 2^(e - 128), ggml's bit patterns for e < 2), so a value
is kvalues[q] * 2^(e - 128) = e2m1(q) * 2^(e - 127), the OCP MX value.

ggml's reference quantizer (ggml-quants.c): amax = the block's largest magnitude (NaN ignored);
e = (uint8_t)(floorf(log2f(amax)) - 2 + 127) when amax > 0, else 0; each value gets the first index of least
|kvalues[i] * d - x| (float32, strict <, in index order, so +0 wins over -0 and ties go to the lower index).
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32  # values per block
BLOCK_BYTES = 17  # scale byte + 16 bytes of nibbles
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """GGML_E8M0_TO_FP32_HALF: scale bytes (any integer dtype) -> float32 2^(e - 128) by ggml's bit patterns
    (0x00200000 << e for e < 2, (e - 1) << 23 otherwise; 255 gives 2^126 as in ggml, no NaN)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    return bits.view(torch.float32)


def _scale_bytes(amax: torch.Tensor) -> torch.Tensor:
    """`amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0` as int32 in [0, 255]. log2 is taken in float64
    and rounded to float32 (log2f's correctly rounded value: amax a few ulps below 2^k gives k, as in ggml); C's
    out-of-range float -> uint8_t conversion (amax below 2^-125, or infinite) is x86's: through int32, low byte."""
    lg = torch.floor(torch.log2(amax.double()).float())
    e = lg - 2 + 127
    e = torch.where(torch.isfinite(e), e, torch.full_like(e, -2.0 ** 31))  # cvttss2si's "integer indefinite"
    return torch.where(amax > 0, e.to(torch.int64).to(torch.int32) & 0xFF, torch.zeros_like(e, dtype=torch.int32))


def quantize_mxfp4_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_mxfp4_ref on (nb, 32) float32 blocks -> (nb, 17) uint8: [e, qs[0..15]] per block."""
    amax = blocks.abs()
    amax = torch.where(torch.isnan(amax), torch.zeros_like(amax), amax).max(1).values  # `amax < fabsf(v)`
    e = _scale_bytes(amax)
    d = e8m0_half(e)[:, None]
    best_err = (torch.tensor(float(KVALUES[0]), device=blocks.device) * d - blocks).abs()
    best = torch.zeros(blocks.shape, dtype=torch.int32, device=blocks.device)
    for i in range(1, 16):
        err = (torch.tensor(float(KVALUES[i]), device=blocks.device) * d - blocks).abs()
        take = err < best_err  # NaN never takes
        best = torch.where(take, torch.full_like(best, i), best)
        best_err = torch.where(take, err, best_err)
    qs = best[:, :16] | (best[:, 16:] << 4)
    return torch.cat([e[:, None], qs], 1).to(torch.uint8)


def dequantize_mxfp4(data, cols: int) -> torch.Tensor:
    """ggml's dequantize_row_mxfp4: MXFP4 bytes -> float32 values kvalues[q] * 2^(e - 128).

    data: uint8 numpy array or tensor holding whole blocks (any shape, rows of cols / 32 * 17 bytes, e.g. what
    kquants.quantize(t, "MXFP4") returns or a GGUF tensor's raw data); cols: values per row (a multiple of 32). Returns a float32
    tensor (rows, cols) on data's device (CPU for numpy). Raises ValueError when the bytes do not make whole rows."""
    raw = torch.as_tensor(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).reshape(-1)
    per_row = cols // BLOCK * BLOCK_BYTES
    if cols % BLOCK or raw.numel() % per_row:
        raise ValueError(f"{raw.numel()} MXFP4 bytes do not make whole rows of {cols} values ({per_row} bytes each)")
    b = raw.to(torch.uint8).reshape(-1, BLOCK_BYTES)
    lut = torch.tensor(KVALUES, dtype=torch.float32, device=b.device)
    qs = b[:, 1:].long()
    q = torch.cat([lut[qs & 0x0F], lut[qs >> 4]], 1)
    return (q * e8m0_half(b[:, 0])[:, None]).reshape(-1, cols)
