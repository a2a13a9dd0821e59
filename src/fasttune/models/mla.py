"""Multi-head latent attention (DeepSeek-V2/V3's MLA, as in GLM-4.7-Flash; transformers' Glm4MoeLiteAttention, under
its module and parameter names).

Queries: q_proj(x), or q_b_proj(q_a_layernorm(q_a_proj(x))) through a q_lora_rank-wide latent. Keys and values:
kv_a_proj_with_mqa(x) gives a kv_lora_rank-wide latent and one rotated key part shared by every head;
kv_b_proj(kv_a_layernorm(latent)) gives each head's unrotated key part and its value. Each head's query and key are
qk_nope_head_dim unrotated channels then head_dim (qk_rope_head_dim) rotated ones; RoPE pairs adjacent channels
unless rope_interleave is False. Interleaved pairs are rotated as the usual half-split RoPE on channels reordered
evens-then-odds, which is also the layout transformers' apply_rotary_pos_emb_interleave returns, so keys and queries
equal transformers' channel for channel.

Training attends through the decoder's SDPA / varlen paths. Generation caches, as transformers does, only the normed
latent and the rotated key part per position (KVCache), and attends over them in the absorbed form (DeepSeek-V2's
section 2.1.3): each head's query part without RoPE is multiplied by that head's key block of kv_b_proj, so its
scores are taken against the latent directly, and the head's output over the latent is multiplied by its value
block (a LoRA on kv_b_proj in its factored form, a DoRA update merged in). A first prefill (an empty cache) attends
over the expanded keys and values instead, through the causal kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttune.kernels.rope import apply_rope_qk, pair_order
from fasttune.models.attention import attention
from fasttune.models.config import ModelConfig
from fasttune.models.varlen import varlen_attention
from fasttune.peft.lora import project
from fasttune.peft.lora_layer import LoraLinear


class LatentAttention(nn.Module):
    """One layer's multi-head latent attention (see the module docstring). `norm(dim)` builds the latents' RMSNorms
    (the decoder's RMSNorm, passed in so this module does not import the decoder)."""

    keeps_block = False  # "offload" keeps only the attention output here (models/kept_block.py needs q/k/v projections)
    sliding_window = None
    rope_kind = "global"
    o_name = "o_proj"

    def __init__(self, cfg: ModelConfig, layer_idx: int, norm):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, heads = cfg.hidden_size, cfg.num_heads
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.head_dim
        self.qk_dim = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_a_layernorm = norm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + self.rope, bias=cfg.attn_bias)
        self.kv_a_layernorm = norm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (self.nope + cfg.value_dim), bias=False)
        self.o_proj = nn.Linear(heads * cfg.value_dim, h, bias=cfg.o_bias)

    @property
    def out_layer(self) -> nn.Module:
        """The output projection, o_proj."""
        return self.o_proj

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, H); cos/sin (B, T, head_dim); mask: the decoder's mask dict (global entry None, or "varlen");
        cache: a KVCache to extend (generation). Returns (B, T, H)."""
        b, t, _ = x.shape
        cfg, heads = self.cfg, self.cfg.num_heads
        if cfg.q_lora_rank:
            q_latent, kv = project(x, self.q_a_proj, self.kv_a_proj_with_mqa)
            q = project(self.q_a_layernorm(q_latent), self.q_b_proj)[0]
        else:
            q, kv = project(x, self.q_proj, self.kv_a_proj_with_mqa)
        q_nope, q_rot = q.view(b, t, heads, self.qk_dim).split([self.nope, self.rope], dim=-1)
        latent, k_rot = kv.split([cfg.kv_lora_rank, self.rope], dim=-1)
        k_rot = k_rot.reshape(b, t, 1, self.rope)
        if cfg.rope_interleaved:
            order = pair_order(self.rope, self.rope, x.device)
            q_rot, k_rot = q_rot.index_select(-1, order), k_rot.index_select(-1, order)
        q_rot, k_rot = apply_rope_qk(q_rot.contiguous(), k_rot.contiguous(), cos, sin)
        if mask.get("query_scale") is not None:  # Mistral 4's per-position factors, after RoPE as transformers'
            q_nope, q_rot = q_nope * mask["query_scale"], q_rot * mask["query_scale"]
        latent = self.kv_a_layernorm(latent)
        if cache is not None:
            cached = torch.cat((latent, k_rot.view(b, t, self.rope)), dim=-1)[:, None]  # (B, 1, T, rank + rope)
            first = cache.length == 0 and cache.slot is None and t > 1
            keys, _ = cache.update(self.layer_idx, cached, cached[..., :0])
            if not first:
                return self._absorbed(q_nope, q_rot, keys, mask.get(None))
        k_nope, v = project(latent, self.kv_b_proj)[0].view(
            b, t, heads, self.nope + cfg.value_dim).split([self.nope, cfg.value_dim], dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(b, t, heads, self.rope)), dim=-1)
        spans = mask.get("varlen")
        if spans is not None:  # packed rows on CUDA; flash's varlen kernel wants q, k and v equally wide (a multiple
            # of 8): zero channels change no score (the scale is given) and give zero outputs, which are cut off
            width = -(-max(self.qk_dim, cfg.value_dim) // 8) * 8
            q, k, v = (F.pad(a, (0, width - a.shape[-1])) for a in (q, k, v))
            out = varlen_attention(q, k, v, spans, None, cfg.scaling)[..., :cfg.value_dim]
            return project(out.reshape(b, t, heads * cfg.value_dim), self.o_proj)[0]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = attention(q, k, v, mask.get(None), cfg.scaling, None)
        return project(out.transpose(1, 2).reshape(b, t, heads * cfg.value_dim), self.o_proj)[0]

    def _absorbed(self, q_nope, q_rot, keys, mask):
        """Attention over the cached latents: q_nope (B, T, heads, qk_nope_head_dim), q_rot (B, T, heads, head_dim)
        rotated; keys (B, 1, S, kv_lora_rank + head_dim) from the KVCache; mask as attention() takes it. Returns the
        o_proj output (B, T, hidden). A plain LoRA on kv_b_proj is applied in its factored form (two rank-r products
        per block, not a merged weight rebuilt every step)."""
        cfg, rank = self.cfg, self.cfg.kv_lora_rank
        b, t, heads, _ = q_nope.shape
        layer, dtype, width = self.kv_b_proj, q_nope.dtype, self.nope + cfg.value_dim
        lora = type(layer) is LoraLinear and not layer.disabled
        w = (layer.weight.to(dtype) if lora else effective_weight(layer, dtype)).view(heads, width, rank)
        w_k, w_v = w.split([self.nope, cfg.value_dim], dim=1)
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_k)
        if lora:  # q_nope (B_k A) = (q_nope B_k) A, B_k / B_v: lora_B's rows of the head's key / value block
            a, b_k, b_v = self._lora_blocks(layer, dtype)
            q_lat = q_lat + layer.scaling * torch.einsum("bthj,jr->bhtr", torch.einsum("bthn,hnj->bthj", q_nope, b_k),
                                                         a)
        q = torch.cat((q_lat, q_rot.transpose(1, 2)), dim=-1)
        out = attention(q, keys, keys[..., :rank], mask, cfg.scaling, None)  # (B, heads, T, rank)
        values = torch.einsum("bhtr,hvr->bthv", out, w_v)
        if lora:
            values = values + layer.scaling * torch.einsum("bhtj,hvj->bthv", torch.einsum("bhtr,jr->bhtj", out, a),
                                                           b_v)
        return project(values.reshape(b, t, heads * cfg.value_dim), self.o_proj)[0]

    def _lora_blocks(self, layer, dtype):
        """(lora_A (r, kv_lora_rank), lora_B's key rows (heads, qk_nope_head_dim, r), its value rows (heads,
        v_head_dim, r)) of a LoRA on kv_b_proj, in `dtype`."""
        b = layer.lora_B.to(dtype).view(self.cfg.num_heads, self.nope + self.cfg.value_dim, -1)
        b_k, b_v = b.split([self.nope, self.cfg.value_dim], dim=1)
        return layer.lora_A.to(dtype), b_k, b_v


def effective_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight `layer` applies, in `dtype`: a Linear's weight, a quantised base dequantised, plus a LoRA
    or DoRA layer's update (its delta_weight, as merging adds it) unless the adapter is disabled."""
    w = layer.weight
    delta = getattr(layer, "delta_weight", None)
    if delta is None or getattr(layer, "disabled", False):
        return w.to(dtype)
    return (w.float() + delta().float()).to(dtype)
