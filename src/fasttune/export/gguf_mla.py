"""Multi-head latent attention (models/mla.py: GLM-4.7-Flash, DeepSeek-V3) in llama.cpp's `deepseek2` layout, as its
convert_hf_to_gguf.py (DeepseekV2Model, Glm4MoeLiteModel) writes it.

llama.cpp runs MLA as multi-query attention over the latent: one key/value head whose key is the kv_lora_rank-wide
normed latent plus the rotated part and whose value is the latent, with kv_b_proj split per head into attn_k_b
(heads, kv_lora_rank, qk_nope_head_dim: the unrotated key part, transposed, applied to the query) and attn_v_b
(heads, v_head_dim, kv_lora_rank: applied to the attention output). The true per-head sizes go in
key_length_mla / value_length_mla. llama.cpp rotates adjacent pairs, the layout of rope_interleave checkpoints;
rows of a rotate-half checkpoint are reordered into it.
"""
from __future__ import annotations

import torch

from fasttune.export.gguf_types import interleave_rotary_rows

MLA_ARCHITECTURES = ("deepseek2", "mistral4")  # (mistral4: deepseek2's graph, Mistral Small 4's name)


def mla_tensors(name: str, t: torch.Tensor, cfg) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for one merged tensor `name` (transformers' name, fp32) of a ModelConfig `cfg` with
    multi-head latent attention: kv_b_proj split into k_b_proj / v_b_proj (named so gguf's tensor map finds
    attn_k_b / attn_v_b); with rope_interleave False, the rotated rows of q_b_proj (q_proj) and kv_a_proj_with_mqa put
    in adjacent pairs; every other tensor as it is."""
    heads, nope, rope, rank = cfg.num_heads, cfg.qk_nope_head_dim, cfg.head_dim, cfg.kv_lora_rank
    if name.endswith("self_attn.kv_b_proj.weight"):
        per_head = t.view(heads, nope + cfg.value_dim, rank)
        k_b, v_b = per_head.split([nope, cfg.value_dim], dim=1)
        return [(name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous()),
                (name.replace("kv_b_proj", "v_b_proj"), v_b.contiguous())]
    if not cfg.rope_interleaved and name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        per_head = t.view(heads, nope + rope, -1).clone()
        per_head[:, nope:] = interleave_rotary_rows(per_head[:, nope:].reshape(heads * rope, -1), heads).view(
            heads, rope, -1)
        return [(name, per_head.reshape(t.shape))]
    if not cfg.rope_interleaved and name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        t = t.clone()
        t[rank:] = interleave_rotary_rows(t[rank:], 1)
        return [(name, t)]
    return [(name, t)]


def write_mla_metadata(writer, cfg) -> None:
    """deepseek2's attention keys for `cfg`: one key/value head of the latent's width (plus the rotated part for
    keys), the per-head sizes as the _mla lengths, the latent ranks and the rotated width (its yarn keys are
    gguf.py's)."""
    writer.add_head_count_kv(1)
    writer.add_key_length(cfg.kv_lora_rank + cfg.head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.head_dim)
    writer.add_value_length_mla(cfg.value_dim)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    if cfg.q_lora_rank:
        writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_rope_dimension_count(cfg.head_dim)
