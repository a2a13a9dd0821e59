"""MXFP4 (OCP microscaling FP4), the format gpt-oss checkpoints store their experts in: dequantised on load.

A checkpoint holds, for a stacked expert weight `W` of transformers' GptOssExperts, `<name>_blocks` (E, R, G, 16)
uint8 and `<name>_scales` (E, R, G) uint8. Row r of expert e is G blocks of 32 values; each byte holds two e2m1
(FP4) codes, the low nibble first, and each block one e8m0 scale (a power of two, 2^(s - 127)). The rows are the
output features of the transposed weight: the dequantised (E, R, G * 32) tensor, transposed in its last two
dimensions, is W as transformers keeps it (gate_up_proj (E, H, 2I), down_proj (E, I, H)). This is the layout
transformers' integrations/mxfp4.py (`convert_moe_packed_tensors`) reads; `quantize_mxfp4` writes it (tests,
round trips).
"""
from __future__ import annotations

import torch

# The 16 e2m1 codes: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127  # e8m0: 2 ** (byte - 127)
SUFFIXES = ("_blocks", "_scales")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     rows_per_chunk: int = 1 << 20) -> torch.Tensor:
    """blocks (..., R, G, 16) uint8 and scales (..., R, G) uint8 -> the weight (..., G * 32, R) in `dtype`, rows
    and columns as the module holds it (see the module docstring). Every value is code * 2^(scale - 127), exact
    in fp32 and bf16. Works `rows_per_chunk` rows at a time to bound the temporaries. Raises ValueError when
    the shapes do not pair."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair (blocks "
                         f"must be scales' shape plus a last dimension of {BLOCK // 2} bytes).")
    *lead, rows, groups, nbytes = blocks.shape
    flat_blocks = blocks.reshape(-1, groups * nbytes).to(torch.uint8)
    flat_scales = scales.reshape(-1, groups).to(torch.int32) - SCALE_BIAS
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(flat_blocks.shape[0], groups * BLOCK, dtype=dtype, device=blocks.device)
    for start in range(0, flat_blocks.shape[0], rows_per_chunk):
        b = flat_blocks[start:start + rows_per_chunk]
        values = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)  # low nibble first
        values = values.view(b.shape[0], groups, BLOCK)
        exp = flat_scales[start:start + rows_per_chunk, :, None]
        out[start:start + rows_per_chunk] = torch.ldexp(values, exp).view(b.shape[0], -1).to(dtype)
    return out.view(*lead, rows, groups * BLOCK).transpose(-1, -2).contiguous()


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse layout of dequantize_mxfp4: weight (..., K, R) with K a multiple of 32 -> (blocks (..., R, K/32,
    16) uint8, scales (..., R, K/32) uint8). Each block's scale is the smallest power of two that brings its
    largest magnitude to at most 6, each value the nearest code (ties to the smaller
    magnitude). Values representable in
    MXFP4 round-trip exactly."""
    w = weight.transpose(-1, -2).float()
    *lead, rows, k = w.shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 packs {BLOCK} values per block; the weight's input dimension {k} is not a multiple.")
    w = w.reshape(*lead, rows, k // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = w / torch.exp2(exp)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs()[..., None] - magnitudes).abs()
    # ties go to the smaller magnitude (argmin takes the first); representable values have distance 0
    code = nearest.argmin(dim=-1).to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)
    code = code.view(*lead, rows, k // BLOCK, BLOCK // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    scales = (exp[..., 0] + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


def mxfp4_tensors(tensors, dtype: torch.dtype):
    """A checkpoint's (name, tensor) stream with each `<name>_blocks` / `<name>_scales` pair replaced by one
    dequantised `<name>` tensor in `dtype` (emitted when the second of the pair arrives); other tensors pass
    through. Raises ValueError at the end for a blocks or scales tensor whose partner never came."""
    waiting: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in tensors:
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            yield name, t
            continue
        base = name[:-len(suffix)]
        if base not in waiting:
            waiting[base] = (suffix, t)
            continue
        other_suffix, other = waiting.pop(base)
        if other_suffix == suffix:
            raise ValueError(f"checkpoint has '{name}' twice.")
        blocks, scales = (t, other) if suffix == "_blocks" else (other, t)
        yield base, dequantize_mxfp4(blocks, scales, dtype)
    if waiting:
        base, (suffix, _) = next(iter(waiting.items()))
        missing = "_scales" if suffix == "_blocks" else "_blocks"
        raise ValueError(f"MXFP4 tensor '{base}{suffix}' has no '{base}{missing}' in the checkpoint.")
