"""FP8 checkpoints in transformers' FineGrainedFP8 layout (quant/fp8.py), written from a saved 16-bit one for tests:
each chosen weight as float8_e4m3fn with per-block `weight_scale_inv`, the config's quantization_config saying so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FP8_MAX = 448.0  # float8_e4m3fn's largest value


def quantize_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) -> (float8_e4m3fn values, fp32 scale_inv (..., ceil(N / bn), ceil(K / bk))), each block scaled
    so its largest magnitude is FP8_MAX; block None: one scale for the tensor."""
    w = w.float()
    if block is None:
        s = w.abs().max().clamp(min=1e-12) / FP8_MAX
        return (w / s).to(torch.float8_e4m3fn), s.reshape(())
    bn, bk = block
    rows, cols = w.shape[-2:]
    pad = torch.nn.functional.pad(w, (0, -cols % bk, 0, -rows % bn))
    blocks = pad.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # (..., R, bn, C, bk)
    s = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX  # (..., R, C)
    full = s.repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :cols]
    return (w / full).to(torch.float8_e4m3fn), s


def to_compressed_tensors(src, dst) -> tuple[Path, Path]:
    """compressed-tensors' FP8 ("float-quantized", per-channel weight scales, dynamic activations) of the checkpoint
    folder `src` in `dst`, and beside it (`dst`.parent / "reference") the plain checkpoint of what it holds (each
    float8 row times its scale), for transformers to load. Returns (dst, reference)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    ref = dst.parent / "reference"
    for folder in (dst, ref):
        shutil.copytree(src, folder, dirs_exist_ok=True)
    for file in sorted(src.glob("*.safetensors")):
        packed, plain = {}, {}
        for name, t in load_file(file).items():
            if ".layers." in name and name.endswith("proj.weight"):
                scale = t.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # (out, 1)
                q = (t.float() / scale).to(torch.float8_e4m3fn)
                packed[name], packed[name[:-len("weight")] + "weight_scale"] = q, scale
                plain[name] = q.float() * scale
            else:
                packed[name] = plain[name] = t
        save_file(packed, dst / file.name, metadata={"format": "pt"})
        save_file(plain, ref / file.name, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    (dst / "config.json").write_text(json.dumps(config))
    return dst, ref


def to_fp8_checkpoint(src, dst, block=(16, 16), chosen=lambda name: ".layers." in name and name.endswith(
        "proj.weight"), static: bool = False, stacked: tuple = ()) -> Path:
    """Copy the checkpoint folder `src` to `dst` with the weights `chosen` by name (default: the decoder layers'
    projections; `stacked`: further names of stacked expert tensors, paired as `<name>_scale_inv`) in FP8 and
    quantization_config {"quant_method": "fp8", "weight_block_size": block, "activation_scheme": ...}; `static`
    adds an `activation_scale` per weight, as static-scheme checkpoints carry. Returns `dst`."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for file in sorted(dst.glob("*.safetensors")):
        out = {}
        for name, t in load_file(file).items():
            if chosen(name) or name.endswith(stacked):
                out[name], scale = quantize_fp8(t, block)
                key = name[:-len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
                out[key] = scale
                if static:
                    out[name.rsplit(".", 1)[0] + ".activation_scale"] = torch.tensor(0.01)
            else:
                out[name] = t
        save_file(out, file, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block) if block else None,
                                     "activation_scheme": "static" if static else "dynamic"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst
