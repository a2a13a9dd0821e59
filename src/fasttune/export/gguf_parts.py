"""Each merged tensor's GGUF form (export/gguf.py writes them; models/gguf_hybrid.py asks for the names to read the
hybrids' files back): llama.cpp's tensor name(s) and layout per architecture, the splits of fused tensors (stacked
experts' gate and up, latent attention's kv_b_proj, Granite 4.0's shared MLP) and the reorders (rotary pairs,
DeltaNet value heads, Mamba tensors). Sources as export/gguf.py's."""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_falcon_h1 import FALCON_H1, falcon_h1_tensors
from fasttune.export.gguf_gemma4 import gemma4_router_scale_name
from fasttune.export.gguf_granite import (GRANITE_HYBRID, NEMOTRON_H, NEMOTRON_H_MOE, granite_hybrid_tensors,
                                          nemotron_h_tensors)
from fasttune.export.gguf_mla import MLA_ARCHITECTURES, mla_tensors
from fasttune.export.gguf_qwen35 import DELTANET_ARCHITECTURES, is_gated_norm, linear_attention_tensor
from fasttune.export.gguf_types import ROTATE_PAIRS, interleave_rotary_rows

# The Mamba-2 hybrids' tensor writers: (our name, tensor, ModelConfig) -> [(name gguf's map knows, tensor)]
HYBRID_TENSORS = {GRANITE_HYBRID: granite_hybrid_tensors, NEMOTRON_H: nemotron_h_tensors,
                  NEMOTRON_H_MOE: nemotron_h_tensors, FALCON_H1: falcon_h1_tensors}



def gguf_parts(name: str, t: torch.Tensor, cfg, arch: str, names) -> dict[str, torch.Tensor]:
    """One merged tensor (our name, fp32) -> {llama.cpp's name: tensor in its layout} for architecture `arch` (names:
    gguf's tensor map of it): usually one tensor, several where llama.cpp splits one (stacked experts' gate and up,
    latent attention's kv_b_proj, Granite 4.0's fused MLP), none for values that go into the metadata. The reverse of
    the names and splits is what models/gguf_hybrid.py reads back. Raises ConfigError for a tensor the architecture
    has no place for."""
    out = {}
    if arch == "gpt-oss" and ".mlp.experts." in name:
        return _gpt_oss_experts(name, t, names)
    if ".mlp.act_fn." in name:  # Apertus' xIELU scalars: GGUF metadata (_write_metadata), not tensors
        return out
    if name.endswith(("self_attn.sinks", "layer_scalar")):  # (gpt-oss's sinks, Gemma 4's output scale)
        name += ".weight"
    if name.endswith(("mlp.experts.gate_up_proj", "feed_forward.experts.gate_up_proj")):  # (E, 2I, H), gate rows
        # first -> two (E, I, H) tensors
        gate, up = t.chunk(2, dim=1)
        for part, proj in ((gate, "gate_proj"), (up, "up_proj")):
            out[names.get_name(f"{name.removesuffix('gate_up_proj')}{proj}.weight",
                               try_suffixes=(".weight",))] = part.contiguous()
        return out
    if name.endswith(("experts.down_proj", "experts.gate_up_proj")):  # (Gemma 4's fused gate_up stays whole)
        name += ".weight"
    if arch == "gemma4" and name.endswith(("router.scale", "router.per_expert_scale")):
        out[gemma4_router_scale_name(name)] = t  # 26B-A4B (export/gguf_gemma4.py)
        return out
    if name.endswith("gate.e_score_correction_bias"):  # GLM-4.5's routing bias: llama.cpp's exp_probs_b.bias
        name = name.removesuffix("_bias") + ".bias"
    if name.endswith("gate.moe_statics.e_score_correction_bias"):  # ERNIE 4.5 MoE's (1, E): the same, (E,)
        name, t = name.replace("gate.moe_statics.e_score_correction_bias", "moe_statics.e_score_correction.bias"), \
            t.reshape(-1)
    if name.endswith("feed_forward.expert_bias"):  # LFM2-MoE's, the same
        name += ".bias"
    # llama.cpp's ROTATE_PAIRS architectures rotate adjacent pairs (a NoPE layer's q and k move alike: scores
    # unchanged)
    if arch in ROTATE_PAIRS and name.endswith(("q_proj.weight", "q_proj.bias")):
        t = interleave_rotary_rows(t, cfg.num_heads, cfg.rotary_dim)
    elif arch in ROTATE_PAIRS and name.endswith(("k_proj.weight", "k_proj.bias")):
        t = interleave_rotary_rows(t, cfg.num_kv_heads, cfg.rotary_dim)
    if arch in DELTANET_ARCHITECTURES:
        name, t = linear_attention_tensor(name, t, cfg, tiled=arch != "qwen3next")
    if arch in MLA_ARCHITECTURES and ".self_attn." in name:  # kv_b_proj split into attn_k_b / attn_v_b
        for part, value in mla_tensors(name, t, cfg):
            out[names.get_name(part, try_suffixes=(".weight", ".bias"))] = value
        return out
    if arch in HYBRID_TENSORS:  # the Mamba-2 hybrids (export/gguf_granite.py, export/gguf_falcon_h1.py)
        for part, value in HYBRID_TENSORS[arch](name, t, cfg):
            out[_gguf_name(names, part, arch)] = value
        return out
    if arch in ("lfm2", "lfm2moe") and name.endswith("conv.conv.weight"):  # llama.cpp's shortconv.conv: (C, K)
        t = t[:, 0]
    if cfg.norm_offset and name.endswith("norm.weight") and not is_gated_norm(name):
        t = t + cfg.norm_offset
    out[_gguf_name(names, name, arch)] = t
    return out


def _gguf_name(names, name: str, arch: str) -> str:
    """llama.cpp's name for the tensor transformers calls `name` (gguf's tensor map). Raises ConfigError for a
    tensor the architecture has no place for."""
    new = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ConfigError(f"Tensor '{name}' has no place in llama.cpp's '{arch}' architecture; this model cannot "
                          f"be exported to GGUF as it is.")
    return new


def _gpt_oss_experts(name: str, t: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """gpt-oss's stacked experts (transformers' (E, in, out) weights, gate/up interleaved along out, biases (E, out))
    -> llama.cpp's ffn_{gate,up,down}_exps weights (E, out, in) and biases (E, out), as convert_hf_to_gguf.py's
    GptOssModel writes them from unquantised experts."""
    prefix, _, kind = name.rpartition(".")
    if kind in ("gate_up_proj", "down_proj"):
        t = t.transpose(-1, -2)  # (E, out, in)
    suffix = "bias" if kind.endswith("_bias") else "weight"
    if kind.startswith("gate_up_proj"):
        parts = {"gate_proj": t[:, ::2], "up_proj": t[:, 1::2]}
    else:
        parts = {"down_proj": t}
    return {names.get_name(f"{prefix}.{proj}.{suffix}", try_suffixes=(".weight", ".bias")): v.contiguous()
            for proj, v in parts.items()}
