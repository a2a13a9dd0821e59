"""Read llama.cpp's "qwen35" / "qwen35moe" / "qwen3next" GGUF files (Qwen3.5's language model, Qwen3-Next) back into
transformers' layout:
the config from the file's keys and each tensor undone from llama.cpp's form. transformers has no GGUF tables for
these architectures; this is the reverse of export/gguf_qwen35.py (whose value-head reorder it runs backwards) and
of what llama.cpp's convert_hf_to_gguf.py (Qwen3NextModel, _LinearAttentionVReorderBase) writes:

- ssm_a = -exp(A_log) -> A_log = log(-ssm_a); ssm_dt.bias -> dt_bias; the conv (channels, kernel) -> (channels, 1,
  kernel);
- every RMSNorm weight but the DeltaNet layers' gated norm was stored as 1 + w -> w;
- value heads in llama.cpp's tiled order (value head p with key head p % key heads) -> transformers' grouped one
  (key head g's value heads in a row), in the value rows of in_proj_qkv and of the conv, in in_proj_z / in_proj_a /
  in_proj_b / A_log / dt_bias, and in out_proj's input columns (qwen35 only: qwen3next keeps transformers' grouping
  in its fused in_proj_qkvz / in_proj_ba, and so in the other DeltaNet tensors).
"""
from __future__ import annotations

import torch

from fasttune.errors import ModelLoadError
from fasttune.export.gguf_qwen35 import is_gated_norm, reorder_value_heads

ARCHITECTURES = {"qwen35": "qwen3_5_text", "qwen35moe": "qwen3_5_moe_text", "qwen3next": "qwen3_next"}


def qwen35_config(get, arch: str, path) -> dict:
    """Qwen3_5TextConfig / Qwen3_5MoeTextConfig fields (with model_type) from the file's `arch.*` keys, as our
    export/gguf.py and llama.cpp's converter write them. get: gguf_file.arch_values of the file (key -> value);
    arch: "qwen35" or "qwen35moe"; path: the file, for messages. Raises ModelLoadError for a file without the
    DeltaNet keys llama.cpp's qwen35 needs."""
    needed = ("block_count", "embedding_length", "attention.head_count", "ssm.conv_kernel", "ssm.state_size",
              "ssm.group_count", "ssm.time_step_rank", "ssm.inner_size")
    missing = [k for k in needed if get(k) is None]
    if missing:
        raise ModelLoadError(f"{path}: this {arch} GGUF lacks {', '.join(f'{arch}.{k}' for k in missing)}, which "
                             f"llama.cpp's {arch} needs. The file is incomplete; convert the model again.")
    layers, heads = int(get("block_count")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", int(get("embedding_length")) // heads))
    interval = int(get("full_attention_interval", 4))
    value_heads = int(get("ssm.time_step_rank"))
    rotary = int(get("rope.dimension_count", head_dim))
    sections = [int(s) for s in (get("rope.dimension_sections") or [])][:3]
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000000.0)),
            "partial_rotary_factor": rotary / head_dim}
    if arch != "qwen3next":  # Qwen3.5's interleaved multimodal RoPE (Qwen3-Next's is plain partial RoPE)
        rope.update(mrope_interleaved=True, **({"mrope_section": sections} if sum(sections) * 2 == rotary else {}))
    fields = dict(
        model_type=ARCHITECTURES[arch], hidden_size=int(get("embedding_length")), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length", 0)) or None,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 32768)),
        layer_types=["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)],
        linear_conv_kernel_dim=int(get("ssm.conv_kernel")), linear_key_head_dim=int(get("ssm.state_size")),
        linear_num_key_heads=int(get("ssm.group_count")), linear_num_value_heads=value_heads,
        linear_value_head_dim=int(get("ssm.inner_size")) // value_heads,
        rope_parameters=rope)
    if arch in ("qwen35moe", "qwen3next"):
        fields.update(num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                      moe_intermediate_size=int(get("expert_feed_forward_length")),
                      shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length")))
    return {k: v for k, v in fields.items() if v is not None}


def gguf_lookup_name(name: str) -> str:
    """Our parameter name -> the name gguf's qwen35 tensor map knows (dt_bias is llama.cpp's ssm_dt.bias)."""
    return name.removesuffix("dt_bias") + "dt_proj.bias" if name.endswith("linear_attn.dt_bias") else name


def from_gguf(name: str, t: torch.Tensor, config: dict) -> torch.Tensor:
    """One tensor as read from the file (our name, float32) -> transformers' layout (config: the fields of
    qwen35_config; a qwen3_next one has no tiled value heads to undo)."""
    if name.endswith("norm.weight") and not is_gated_norm(name):
        return t - 1.0
    if ".linear_attn." not in name:
        return t
    if name.endswith(".A_log"):
        t = (-t).log()
    elif name.endswith("conv1d.weight"):
        t = t.reshape(t.shape[0], -1)
    if config["model_type"] != "qwen3_next":
        t = reorder_value_heads(name, t, config["linear_num_key_heads"], config["linear_num_value_heads"],
                                config["linear_key_head_dim"], config["linear_value_head_dim"], inverse=True)
    return t[:, None] if name.endswith("conv1d.weight") else t
