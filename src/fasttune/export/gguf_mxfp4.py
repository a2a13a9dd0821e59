"""MXFP4 experts of gpt-oss GGUF files taken from the model's own MXFP4 checkpoint, without re-quantizing.

When a gpt-oss model was loaded from a checkpoint whose experts are MXFP4 (`<name>_blocks` / `<name>_scales`, as
OpenAI publishes gpt-oss; quant/mxfp4.py dequantises them on load) and its experts were not changed since (no expert
LoRA merged, no training), llama.cpp's convert_hf_to_gguf.py (GptOssModel) writes those blocks as they are: the
scale byte kept (both formats mean 2^(s - 127) times an E2M1 value; ggml stores the codes doubled and halves the
scale), the 32 codes of a block reordered from the checkpoint's pairs (byte k: values 2k and 2k + 1) to ggml's halves
(byte j: values j and j + 16), gate_up's rows split into gate (even rows) and up (odd rows). We do the same.

Re-quantizing the dequantised experts with ggml's reference quantizer (export/mxfp4.py) gives the same values
(every value of an MXFP4 block is exact in bf16/fp32, and ggml's scale 2^(floor(log2 amax) - 2) represents them all
again) but not always the same bytes: a block whose largest code is below 4 (e.g. 3, which a checkpoint quantizer
writes when its largest value rounds down to 3) gets a smaller scale with doubled codes, an all-zero block scale 0,
and a -0 code +0. So the repack is taken whenever the checkpoint's blocks decode to exactly the values being
exported; every other expert tensor is quantized.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_blocks")


def ggml_blocks_from_checkpoint(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A checkpoint's MXFP4 pair -> GGML_TYPE_MXFP4 bytes of the same values.

    blocks: (..., R, G, 16) uint8, byte k of a block holding value 2k in its low nibble and 2k + 1 in its high
    nibble (transformers' `convert_moe_packed_tensors` layout); scales: (..., R, G) uint8 E8M0 bytes. Returns
    (..., R, G * 17) uint8: per block the scale byte, then ggml's 16 bytes (value j low, j + 16 high, the same E2M1
    codes). Raises ValueError when the shapes do not pair."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair")
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    out = torch.cat((scales[..., None], packed), dim=-1)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * 17)


def _checkpoint_pairs(folder: Path):
    """(layer, kind, blocks, scales) for each expert `_blocks` tensor in the folder's safetensors files."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                m = _EXPERTS.fullmatch(key)
                scales_key = key.removesuffix("_blocks") + "_scales"
                if m and scales_key in keys:
                    yield int(m.group(1)), m.group(2), f.get_tensor(key), f.get_tensor(scales_key)


def checkpoint_mxfp4_experts(model, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """GGUF expert name ("blk.0.ffn_gate_exps.weight") -> its MXFP4 bytes repacked from the checkpoint the model was
    loaded from, for each expert tensor whose checkpoint blocks decode (ggml's dequantize_row_mxfp4) to exactly the
    values in `tensors` (GGUF name -> fp32 (E, out, in) tensor, gguf.gguf_tensors' layout).

    model: our gpt-oss model; its name_or_path is the checkpoint folder (nothing is returned for a .gguf file, a
    missing folder, or a checkpoint without MXFP4 experts, or when the scales sit in another shard than their
    blocks). Returns {} when nothing matches; the values are uint8 (E * out, in / 32 * 17) arrays, what
    GGUFWriter.add_tensor takes with raw_dtype MXFP4 after a reshape to (E, out, -1)."""
    from fasttune.export.mxfp4 import dequantize_mxfp4

    folder = Path(str(model.name_or_path or ""))
    if not folder.is_dir():
        return {}
    out = {}
    for layer, kind, blocks, scales in _checkpoint_pairs(folder):
        packed = ggml_blocks_from_checkpoint(blocks, scales)  # (E, R, G * 17)
        parts = {"gate": packed[:, ::2], "up": packed[:, 1::2]} if kind == "gate_up_proj" else {"down": packed}
        for proj, data in parts.items():
            name = f"blk.{layer}.ffn_{proj}_exps.weight"
            target = tensors.get(name)
            if target is None or target.dim() != 3 or tuple(target.shape[:2]) != tuple(data.shape[:2]) \
                    or target.shape[2] != data.shape[2] // 17 * 32:
                continue
            data = data.reshape(-1, data.shape[-1]).contiguous()
            if torch.equal(dequantize_mxfp4(data, target.shape[2]), target.reshape(-1, target.shape[2]).float()):
                out[name] = data.numpy()
    return out
