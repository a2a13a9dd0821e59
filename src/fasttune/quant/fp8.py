"""FP8 checkpoints (transformers' "fp8" quantization_config, its FineGrainedFP8 layout: DeepSeek-V3 / R1, the
Qwen3 "-FP8" releases, Ministral 3, Mistral Small 4, GLM-4.5-FP8, ...): dequantised to the model dtype on load.

A quantised Linear `X` stores `X.weight` as float8_e4m3fn (out, in) beside `X.weight_scale_inv` (fp32 or e8m0):
(ceil(out / bn), ceil(in / bk)) scales for weight_block_size [bn, bk], or a single one per tensor when the config
has no block size. The weight is each fp8 value times the scale of its block ("scale_inv": the inverse of the scale
the values were divided by when quantised). Stacked MoE experts `P` (E, out, in) have `P_scale_inv` (E, rows, cols).
A static activation scale (`X.activation_scale`, activation_scheme "static") serves FP8 matmuls only and is dropped:
the dequantised model computes in 16 bits, as transformers' `FineGrainedFP8Config(dequantize=True)` does. Source:
transformers' integrations/finegrained_fp8.py (the pairing of a weight with its scale, `_dequantize_fp8_weight`).
"""
from __future__ import annotations

import torch

from fasttune.errors import ModelLoadError

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
DROPPED_SUFFIXES = (".activation_scale", ".input_scale")


def scale_name(name: str, suffix: str = "_scale_inv") -> str:
    """The scale tensor's name for a quantised tensor's name, as transformers pairs them: `X.weight` ->
    `X.weight_scale_inv`, a stacked expert `P` -> `P_scale_inv` (compressed-tensors' FP8: suffix "_scale",
    `X.weight_scale`)."""
    return name[:-len(".weight")] + ".weight" + suffix if name.endswith(".weight") else name + suffix


def compressed_tensors_fp8(get) -> tuple[bool, list | None]:
    """(whether a compressed-tensors quantization_config (`get` reads its keys) is FP8 weights fasttune reads: format
    "float-quantized" with 8-bit float weights in every config group, their block structure or None (per channel or
    per tensor: the scale's shape says which)). Its checkpoints store `X.weight` float8 with `X.weight_scale`, the
    scale itself (not its inverse), and an `X.input_scale` for static activations (dropped)."""
    groups = get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if get("format") != "float-quantized" or not weights or any(
            w.get("type") != "float" or w.get("num_bits") != 8 for w in weights):
        return False, None
    blocks = {tuple(w["block_structure"]) for w in weights if w.get("block_structure")}
    return len(blocks) <= 1, (list(blocks.pop()) if blocks else None)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype: torch.dtype) -> torch.Tensor:
    """weight (..., N, K) float8 and its scales -> (..., N, K) in `dtype`: each value times its block's scale
    (scale_inv (..., ceil(N / bn), ceil(K / bk)) for block_size (bn, bk)), or times the one scale when block_size is
    None (or the scales broadcast: compressed-tensors' per channel). Computed in fp32, one matrix of a stack with
    per-matrix scales (MoE experts) at a time to bound the temporaries. Raises ModelLoadError when the scales do not
    fit the weight."""
    s = scale_inv.float()
    blocked = block_size is not None and s.numel() > 1
    rows, cols = weight.shape[-2:]
    if blocked:
        bn, bk = (int(b) for b in block_size)
        want = (*weight.shape[:-2], -(-rows // bn), -(-cols // bk))
        if tuple(s.shape) != want:
            raise ModelLoadError(f"FP8 scales of shape {tuple(s.shape)} do not fit a weight of shape "
                                 f"{tuple(weight.shape)} in blocks of {bn} x {bk} (expected {want}); the checkpoint "
                                 f"or its weight_block_size in config.json is damaged.")
    if weight.dim() > 2 and s.dim() == weight.dim():
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        for i in range(weight.shape[0]):
            out[i] = dequantize_fp8(weight[i], scale_inv[i], block_size, dtype)
        return out
    if not blocked:
        return (weight.float() * (s.reshape(()) if s.numel() == 1 else s)).to(dtype)
    # each block times its scale by broadcasting over a (R, bn, C, bk) view, the last blocks padded to full size
    w = torch.nn.functional.pad(weight.float(), (0, -cols % bk, 0, -rows % bn))
    w = (w.view(want[0], bn, want[1], bk) * s[:, None, :, None]).view(w.shape)
    return w[:rows, :cols].to(dtype)


def fp8_tensors(tensors, dtype: torch.dtype, block_size, source: str, device=None, suffix: str = "_scale_inv"):
    """A checkpoint's (name, tensor) stream with each float8 tensor and its scale (`scale_name`) replaced by one
    dequantised tensor in `dtype` under the weight's name (emitted when the second of the pair arrives, so shards may
    hold them in any order); activation scales are dropped; other tensors pass through. The dequantisation runs on
    `device` (the model's: a GPU does it at its bandwidth, and the host sends one byte per weight, not two); None:
    where the tensors are; `suffix`: the scales' name (scale_name). Raises ModelLoadError, naming `source`, at the end
    for a weight or scale whose partner never came."""

    def dequantized(weight, scale):
        """dequantize_fp8 of one pair on `device`."""
        if device is not None:
            weight, scale = weight.to(device), scale.to(device)
        return dequantize_fp8(weight, scale, block_size, dtype)

    weights: dict[str, tuple[str, torch.Tensor]] = {}  # float8 tensors (name, tensor) waiting for their scale
    scales: dict[str, torch.Tensor] = {}  # scales waiting for their weight, by their own name
    for name, t in tensors:
        if name.endswith(DROPPED_SUFFIXES):
            continue
        if t.dtype in FP8_DTYPES:
            key = scale_name(name, suffix)
            if key in scales:
                yield name, dequantized(t, scales.pop(key))
            else:
                weights[key] = (name, t)
        elif name.endswith(suffix):
            if name in weights:
                weight_name, w = weights.pop(name)
                yield weight_name, dequantized(w, t)
            else:
                scales[name] = t
        else:
            yield name, t
    if weights or scales:
        lonely = next(iter(weights.values()))[0] if weights else next(iter(scales))
        raise ModelLoadError(f"{source}: the FP8 tensor '{lonely}' has no partner ("
                             f"{'its scale ' + scale_name(lonely, suffix) if weights else 'no float8 weight for it'}) "
                             f"in the checkpoint; the download is incomplete or the files are from different models.")


def quantize_fp8_blocks(weight: torch.Tensor, block_size=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (float8_e4m3fn values (N, K), fp32 weight_scale_inv (ceil(N / bn), ceil(K / bk))) in
    transformers' FineGrainedFP8 layout: each bn x bk block (the last ones ragged) scaled to a max |value| of 448
    and rounded to the nearest e4m3 value (kernels/fp8.py's quantize_rows_reference on the block as one row);
    dequantize_fp8 inverts it. An all-zero block gets a tiny scale and zeros.
    The layout DeepSeek-V3 and the Qwen3 "-FP8" releases use with block_size (128, 128)."""
    from fasttune.kernels.fp8 import quantize_rows_reference

    bn, bk = (int(b) for b in block_size)
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, -cols % bk, 0, -rows % bn))  # zeros: no block's maximum
    r, c = padded.shape[0] // bn, padded.shape[1] // bk
    # each block as one row of the row quantiser (the rounding the FP8 layers use), then back in place
    q, s = quantize_rows_reference(padded.view(r, bn, c, bk).transpose(1, 2).reshape(r * c, bn * bk))
    q = q.view(r, c, bn, bk).transpose(1, 2).reshape(padded.shape)[:rows, :cols]
    return q.contiguous(), s.view(r, c)

