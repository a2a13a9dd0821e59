"""Gemma 4's text model in llama.cpp's `gemma4` architecture (its convert_hf_to_gguf's Gemma4Model).

What differs from Gemma 3's file: two head sizes (the full-attention layers' `key_length` / `value_length`, the
sliding ones' `key_length_swa` / `value_length_swa`), key/value heads per layer (an array: the full layers may have
fewer), RoPE over the whole head on both kinds of layer (`rope.dimension_count` and `..._swa`), the per-layer output
scale (`layer_scalar` -> `blk.N.layer_output_scale`), the norms stored as they are (Gemma 4's RMSNorm scales by w,
not 1 + w), and the full layers' proportional RoPE as a `rope_freqs` tensor that only they read: factor 1 on the
rotated pairs and 1e30 (a frequency of ~0) on the rest, since ggml's NeoX rotation turns the first pairs only.
A full layer without v_proj (attention_k_eq_v) is written without attn_v; llama.cpp then takes the keys as values.
E2B / E4B's per-layer embeddings keep transformers' tensors under llama.cpp's names (per_layer_token_embd,
per_layer_model_proj, per_layer_proj_norm, blk.N.inp_gate / proj / post_norm), and their shared key/value layers have
no attn_k / attn_v (`shared_kv_layers` says which). 26B-A4B's experts go in as llama.cpp's fused
`ffn_gate_up_exps` and `ffn_down_exps`, the router as `ffn_gate_inp` with its `scale` as `ffn_gate_inp.scale` and
the per-expert scales as `ffn_down_exps.scale` (gemma4_router_scale_name).
"""
from __future__ import annotations

import re

import torch

# The factor llama.cpp's converter writes for pairs that do not turn (their frequency divided by it: ~0).
STILL = 1e30


def gemma4_rope_freqs(cfg) -> torch.Tensor:
    """The full-attention layers' `rope_freqs` (global_head_dim / 2,) fp32 for a Gemma 4 ModelConfig: 1.0 for the
    first partial_rotary_factor of the pairs (proportional RoPE), STILL for the rest."""
    width = cfg.global_head_dim or cfg.head_dim
    turning = int(width * float(cfg.rope_scaling.get("partial_rotary_factor", 1.0)) / 2)
    return torch.tensor([1.0] * turning + [STILL] * (width // 2 - turning), dtype=torch.float32)


def write_gemma4_metadata(writer, cfg) -> None:
    """llama.cpp's gemma4 keys for a Gemma 4 ModelConfig: head sizes and key/value heads per layer kind, RoPE
    dimensions and bases, the sliding window and its pattern, the final logit soft-cap, the shared key/value layers
    (with their MLP widths) and the per-layer embeddings' width."""
    sliding = [w is not None for w in cfg.sliding_windows]
    full = cfg.layer_config(sliding.index(False)) if False in sliding else cfg
    writer.add_head_count_kv([cfg.num_kv_heads if s else full.num_kv_heads for s in sliding])
    writer.add_key_length(full.head_dim)
    writer.add_value_length(full.head_dim)
    writer.add_key_length_swa(cfg.head_dim)
    writer.add_value_length_swa(cfg.head_dim)
    writer.add_rope_dimension_count(full.head_dim)  # proportional: the whole head, rope_freqs stops the rest
    writer.add_rope_dimension_count_swa(cfg.rotary_dim)
    writer.add_shared_kv_layers(cfg.kv_shared_layers)
    writer.add_embedding_length_per_layer_input(cfg.per_layer_input_size)
    if cfg.double_wide_mlp:  # the shared key/value layers' MLPs are twice as wide
        writer.add_feed_forward_length([cfg.intermediate_size * (1 if cfg.kv_source(i) is None else 2)
                                        for i in range(cfg.num_layers)])
    window = next((w for w in cfg.sliding_windows if w), None)
    if window:
        writer.add_sliding_window(int(window))
    writer.add_sliding_window_pattern(sliding)
    if cfg.final_logit_softcap:
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcap))


def gemma4_router_scale_name(name: str) -> str:
    """llama.cpp's name for a Gemma 4 MoE layer's router scale (H,) or per-expert scales (E,) (transformers' name),
    as convert_hf_to_gguf's Gemma4Model writes them: blk.N.ffn_gate_inp.scale / blk.N.ffn_down_exps.scale."""
    layer = re.search(r"\.layers\.(\d+)\.", name).group(1)
    return f"blk.{layer}.ffn_gate_inp.scale" if name.endswith("router.scale") else f"blk.{layer}.ffn_down_exps.scale"
