"""Granite 4.0's (and Bamba's) hybrid decoder in llama.cpp's "granitehybrid" layout and Nemotron-H's in its
"nemotron_h": the tensors of the Mamba-2 layers and the MLPs, and the keys llama.cpp reads for them (the Mamba ones
also Falcon-H1's, export/gguf_falcon_h1.py). Sources: llama.cpp's convert_hf_to_gguf.py, GraniteHybridModel,
NemotronHModel and Mamba2Model; src/models/granite-hybrid.cpp, nemotron-h.cpp and src/llama-model.cpp's loader.

- the conv is stored as (channels, kernel), A_log as ssm_a = -exp(A_log) and D as ssm_d, both (heads, 1); dt_bias as
  ssm_dt.bias; the gated norm's weight as (groups, channels per group);
- the shared MLP's fused input_linear splits into ffn_gate (first half) and ffn_up, output_linear is ffn_down (beside
  experts: ffn_gate_shexp, ffn_up_shexp, ffn_down_shexp); the stacked experts split into ffn_{gate,up,down}_exps, the
  router is ffn_gate_inp;
- per-layer key/value head counts are 0 in the Mamba layers (how llama.cpp tells them apart), and the attention layers
  use RoPE only when the file says the rope is "finetuned" (position_embedding_type "rope"; Granite 4.0-H: none).
"""
from __future__ import annotations

import warnings

import torch

GRANITE_HYBRID, NEMOTRON_H, NEMOTRON_H_MOE = "granitehybrid", "nemotron_h", "nemotron_h_moe"


def granite_hybrid_tensors(name: str, t: torch.Tensor, cfg) -> list[tuple[str, torch.Tensor]]:
    """One merged tensor (our name, fp32) -> [(transformers-style name that gguf's tensor map knows, tensor in
    llama.cpp's layout)]."""
    mlp = "mlp.shared_expert" if cfg.num_experts else "mlp"  # (beside experts: llama.cpp's *_shexp tensors)
    if name.endswith("shared_mlp.input_linear.weight"):
        gate, up = t.chunk(2, dim=0)
        stem = name.removesuffix("shared_mlp.input_linear.weight")
        return [(f"{stem}{mlp}.gate_proj.weight", gate.contiguous()), (f"{stem}{mlp}.up_proj.weight", up.contiguous())]
    if name.endswith("shared_mlp.output_linear.weight"):
        return [(name.replace("shared_mlp.output_linear", f"{mlp}.down_proj"), t)]
    if ".block_sparse_moe." in name:  # the stacked experts (E, 2I, H) gate rows first, (E, H, I); the router (E, H)
        stem = name.split(".block_sparse_moe.")[0]
        if "experts.gate_up_proj" in name:
            gate, up = t.chunk(2, dim=1)
            return [(f"{stem}.mlp.experts.gate_proj.weight", gate.contiguous()),
                    (f"{stem}.mlp.experts.up_proj.weight", up.contiguous())]
        if "experts.down_proj" in name:
            return [(f"{stem}.mlp.experts.down_proj.weight", t)]
        return [(f"{stem}.mlp.gate.weight", t)]
    return [mamba_tensor(name, t, cfg) if ".mamba." in name else (name, t)]


def mamba_tensor(name: str, t: torch.Tensor, cfg) -> tuple[str, torch.Tensor]:
    """A Mamba-2 mixer's tensor (its name; only the mixer's) in llama.cpp's layout: the conv (C, K),
    ssm_a = -exp(A_log) and D as (heads, 1), dt_bias as dt_proj.bias, the gated norm as (groups, channels per
    group); others as they are."""
    if name.endswith("conv1d.weight"):
        return name, t[:, 0].contiguous()
    if name.endswith(".A_log"):
        return name, (-t.exp())[:, None]
    if name.endswith(".D"):
        return name, t[:, None]
    if name.endswith(".dt_bias"):
        return name.replace(".dt_bias", ".dt_proj.bias"), t
    if name.endswith(".norm.weight"):  # (callers pass the mixer's tensors only: this is its gated norm)
        return name, t.reshape(cfg.mamba_groups, -1)
    return name, t


def nemotron_h_tensors(name: str, t: torch.Tensor, cfg) -> list[tuple[str, torch.Tensor]]:
    """One merged Nemotron-H tensor (transformers' names) -> [(the name gguf's tensor map knows for llama.cpp's
    nemotron_h: backbone.layers.*, tensor in llama.cpp's layout)]: the Mamba layers' as Granite 4.0's."""
    if not name.startswith("model.layers."):
        return [(name, t)]
    layer = int(name.split(".")[2])
    if ".mixer.experts." in name:  # Nemotron 3's ungated expert stacks (E, out, in): ffn_up_exps / ffn_down_exps
        part = "up_proj" if ".experts.up_proj" in name else "down_proj"
        return [(f"model.layers.{layer}.mlp.experts.{part}.weight", t)]
    name = "backbone." + name[len("model."):]
    if cfg.linear_layers[layer] and ".mixer." in name:
        return [mamba_tensor(name, t, cfg)]
    return [(name, t)]


def nemotron_h_metadata(writer, cfg) -> None:
    """The keys llama.cpp's nemotron_h / nemotron_h_moe read beyond the common ones (its converter's, a
    GraniteHybridModel's): the Mamba-2 sizes, key/value heads only in the attention layers and an MLP (or expert)
    width only in the MLP (MoE) layers (0 elsewhere: how llama.cpp tells the layers apart), the shared experts'
    width, the experts' latent width (Nemotron 3 Super), no RoPE, and the norms' eps under the LayerNorm key."""
    mamba_metadata(writer, cfg)
    writer.add_head_count_kv([cfg.num_kv_heads if k == "attention" else 0 for k in cfg.layer_kinds])
    widths = {"mlp": cfg.intermediate_size, "moe": cfg.moe_intermediate_size}
    writer.add_feed_forward_length([widths.get(k, 0) for k in cfg.layer_kinds])
    if cfg.num_experts:  # (Nemotron 3: the shared experts' width; the routing keys are DeepSeek-V3's, gguf.py)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_size)
    if cfg.moe_latent_size is not None:  # Nemotron 3 Super (fc1 / fc2_latent_proj: ffn_latent_down / _up)
        writer.add_moe_latent_size(cfg.moe_latent_size)
    writer.add_rope_scaling_finetuned(False)
    writer.add_layer_norm_eps(cfg.rms_norm_eps)  # (llama.cpp's nemotron_h reads its RMSNorms' eps under this key)


def mamba_metadata(writer, cfg) -> None:
    """The Mamba-2 keys: conv kernel, state size, groups, inner width and heads (as the time-step rank). llama.cpp
    has no key for a time_step_limit and clamps no step (as transformers' own decode step): a narrower limit than
    (0, inf) is warned about, since the file then computes the prompt's steps unclamped."""
    low, high = cfg.time_step_limit
    if low > 0.0 or high < float("inf"):
        warnings.warn(f"time_step_limit={tuple(cfg.time_step_limit)} is not carried into the GGUF file: llama.cpp "
                      f"clamps no Mamba step, so steps outside it are computed as they come (as transformers' decode "
                      f"step does); the merged safetensors keep the limit.", stacklevel=3)
    writer.add_ssm_conv_kernel(cfg.linear_conv_kernel)
    writer.add_ssm_state_size(cfg.mamba_state)
    writer.add_ssm_group_count(cfg.mamba_groups)
    writer.add_ssm_inner_size(cfg.mamba_heads * cfg.mamba_head_dim)
    writer.add_ssm_time_step_rank(cfg.mamba_heads)


def granite_hybrid_metadata(writer, cfg) -> None:
    """The keys llama.cpp's granitehybrid reads beyond the common ones: Granite's four multipliers, the Mamba-2 sizes
    (conv kernel, state, groups, inner width, heads as the time-step rank), 0 key/value heads in the Mamba layers and
    whether the attention layers rotate (rope "finetuned"); with experts their width and the shared MLP's."""
    one = lambda v: 1.0 if v is None else float(v)  # noqa: E731  (Bamba: no multipliers)
    writer.add_embedding_scale(one(cfg.embedding_multiplier))
    writer.add_residual_scale(one(cfg.residual_multiplier))
    writer.add_attention_scale(float(cfg.scaling))
    writer.add_logit_scale(one(cfg.logits_scaling))
    mamba_metadata(writer, cfg)
    writer.add_rope_scaling_finetuned(not cfg.rope_layers or any(cfg.rope_layers))
    if cfg.num_experts:  # Granite 4.0-H Tiny / Small: the shared MLP's width (feed_forward_length: the experts')
        writer.add_expert_shared_feed_forward_length(cfg.intermediate_size)
