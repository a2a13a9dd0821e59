"""Qwen3.5's language model in llama.cpp's "qwen35" layout: the tensors of the gated DeltaNet layers and the keys
llama.cpp reads for them (sources: llama.cpp's convert_hf_to_gguf.py, Qwen3NextModel.modify_tensors and
_LinearAttentionVReorderBase; src/models/qwen35.cpp's loader and graph).

- A_log is stored as ssm_a = -exp(A_log), dt_bias as ssm_dt.bias, the conv as (channels, kernel);
- every RMSNorm weight gets the 1 of transformers' (1 + w), except the gated norm of the DeltaNet layers (a plain w);
- value heads: transformers lets each key head serve `value heads / key heads` consecutive value heads, llama.cpp
  pairs value head p with key head p % key heads (a tiled broadcast), so with more value than key heads the value
  heads are reordered, in the value rows of in_proj_qkv, in in_proj_z / in_proj_a / in_proj_b / A_log / dt_bias,
  the value channels of the conv and the input columns of out_proj;
- q_proj stays whole (each head's query, then its gate), as llama.cpp splits it.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError

# llama.cpp's gated-DeltaNet architectures: Qwen3.5 (dense and MoE) and Qwen3-Next
DELTANET_ARCHITECTURES = ("qwen35", "qwen35moe", "qwen3next")


def is_gated_norm(name: str) -> bool:
    """The DeltaNet layers' gated RMSNorm, whose weight is used as it is (no 1 + w)."""
    return name.endswith("linear_attn.norm.weight")


def _tile_heads(t: torch.Tensor, dim: int, key_heads: int, per_key: int, head: int,
                inverse: bool = False) -> torch.Tensor:
    """Heads along `dim` from transformers' order (key head g's per_key value heads in a row) to llama.cpp's tiled
    one: position i * key_heads + g holds head g * per_key + i; `inverse`: back from the tiled order."""
    shape = t.shape
    split = (per_key, key_heads) if inverse else (key_heads, per_key)
    grouped = t.reshape(*shape[:dim], *split, head, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def reorder_value_heads(name: str, t: torch.Tensor, key_heads: int, value_heads: int, key_dim: int, value_dim: int,
                        inverse: bool = False) -> torch.Tensor:
    """A DeltaNet tensor (our name; the conv as (channels, kernel)) with its value heads in llama.cpp's tiled order,
    or (`inverse`) back in transformers' grouped one: the value rows of in_proj_qkv and of the conv, in_proj_z,
    in_proj_a / in_proj_b / A_log / dt_bias, and out_proj's input columns. Other tensors, and models with one value
    head per key head, are returned as they are."""
    per_key = value_heads // key_heads
    if ".linear_attn." not in name or per_key < 2:
        return t
    tile = lambda x, dim, head: _tile_heads(x, dim, key_heads, per_key, head, inverse)  # noqa: E731
    keys = 2 * key_heads * key_dim  # the q and k rows / channels before the values
    if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        return torch.cat([t[:keys], tile(t[keys:], 0, value_dim)])
    if name.endswith("in_proj_z.weight"):
        return tile(t, 0, value_dim)
    if name.endswith(("in_proj_a.weight", "in_proj_b.weight", ".A_log", ".dt_bias")):
        return tile(t, 0, 1)
    if name.endswith("out_proj.weight"):
        return tile(t, 1, value_dim)
    return t


def linear_attention_tensor(name: str, t: torch.Tensor, cfg, tiled: bool = True) -> tuple[str, torch.Tensor]:
    """One merged tensor of a DeltaNet layer (our name, fp32) -> (the name gguf's qwen35 / qwen3next map knows, the
    tensor as llama.cpp reads it); other tensors pass unchanged. `tiled`: value heads in llama.cpp's tiled order
    (qwen35); Qwen3-Next's fused projections keep transformers' grouping per key head, which its graph splits."""
    if ".linear_attn." not in name:
        return name, t
    if name.endswith(".A_log"):
        t = -t.exp()
    elif name.endswith("conv1d.weight"):
        t = t[:, 0]
    if tiled:
        t = reorder_value_heads(name, t, cfg.linear_key_heads, cfg.linear_value_heads, cfg.linear_key_dim,
                                cfg.linear_value_dim)
    if name.endswith(".dt_bias"):
        name = name.removesuffix("dt_bias") + "dt_proj.bias"
    return name, t


def imatrix_in_gguf_order(name: str, values, cfg):
    """An importance-matrix entry (per input column, float64) collected on our model, in the column order of the GGUF
    tensor `name`: ssm_out's input columns are value heads, which the export tiles (linear_attention_tensor); the
    other entries' columns are the hidden size, unchanged."""
    per_key = cfg.linear_value_heads // max(cfg.linear_key_heads, 1)
    if not name.endswith("ssm_out.weight") or per_key < 2:
        return values
    return _tile_heads(values, 0, cfg.linear_key_heads, per_key, cfg.linear_value_dim)


def full_attention_interval(cfg) -> int:
    """llama.cpp's full_attention_interval for `cfg`'s layer pattern (every n-th layer softmax attention, the rest
    DeltaNet). Raises ConfigError for a pattern llama.cpp cannot describe, or DeltaNet value heads wider than the
    key heads (llama.cpp sizes both by ssm.state_size)."""
    linear = cfg.linear_layers
    full = [i for i, lin in enumerate(linear) if not lin]
    interval = full[0] + 1 if full else 0
    if not full or [not lin for lin in linear] != [(i + 1) % interval == 0 for i in range(len(linear))]:
        raise ConfigError(f"llama.cpp's qwen35 makes every n-th layer softmax attention and the others gated "
                          f"DeltaNet; this model's layer_types {['full' if not x else 'linear' for x in linear]} are "
                          f"not such a pattern, so it cannot be exported to GGUF. Save the merged model with "
                          f"save_pretrained_merged instead. Nothing was written.")
    if cfg.linear_key_dim != cfg.linear_value_dim:
        raise ConfigError(f"llama.cpp's qwen35 needs linear_key_head_dim == linear_value_head_dim; this model has "
                          f"{cfg.linear_key_dim} and {cfg.linear_value_dim}, so it cannot be exported to GGUF. Save "
                          f"the merged model with save_pretrained_merged instead. Nothing was written.")
    return interval


def write_metadata(writer, cfg) -> None:
    """The qwen35 keys beyond the common ones: the DeltaNet sizes, the layer interval and the four RoPE sections.
    A config without sections (text positions are equal on every axis) gets llama.cpp's interleaved rule's
    covering split of the rotary pairs: pair j rotates with axis j % 3, so (11, 11, 10) for 64 rotary dims, as
    transformers' default."""
    writer.add_ssm_conv_kernel(cfg.linear_conv_kernel)
    writer.add_ssm_state_size(cfg.linear_key_dim)
    writer.add_ssm_group_count(cfg.linear_key_heads)
    writer.add_ssm_time_step_rank(cfg.linear_value_heads)
    writer.add_ssm_inner_size(cfg.linear_value_dim * cfg.linear_value_heads)
    writer.add_full_attention_interval(full_attention_interval(cfg))
    if not cfg.mrope_section and cfg.model_type != "qwen3_next":  # (Qwen3-Next's RoPE is plain partial RoPE)
        pairs = cfg.rotary_dim // 2
        writer.add_rope_dimension_sections([len(range(axis, pairs, 3)) for axis in range(3)] + [0])
