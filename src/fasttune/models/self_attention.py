"""One layer's self-attention (`self_attn`, named as transformers names it): q/k/v projections, q/k norms, RoPE and
the attention kernels (SDPA, varlen, batch-1 decode), with its KV cache for generation; and `one_linear`, the batch-1
decode path of a plain Linear that the MLP shares. The decoder around it is models/decoder.py."""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.kernels.decode_attention import decode_attention, decode_attention_usable
from fasttune.kernels.dispatch import use_triton
from fasttune.kernels.gemv import gemv, one_row_linears
from fasttune.kernels.rmsnorm import rms_norm
from fasttune.kernels.rope import apply_rope_qk, pair_order
from fasttune.models.attention import attention
from fasttune.models.config import ModelConfig
from fasttune.models.gemma4 import shared_kv_attention
from fasttune.models.kv_cache import KVCache
from fasttune.models.norm import RMSNorm
from fasttune.models.offload import kept_block
from fasttune.models.varlen import varlen_attention
from fasttune.peft.lora import project


class Attention(nn.Module):
    """Self-attention of one layer: q/k/v projections (fused for Phi-3), optional q/k norm (Qwen3, Gemma 3, OLMo;
    after RoPE for Hunyuan), RoPE (none in SmolLM3's NoPE layers; adjacent pairs for Ernie 4.5 / GLM-4),
    SDPA or varlen attention (GQA), gpt-oss's per-head sink logits (`sinks`), o_proj (LFM2's out_proj); names as
    transformers' `self_attn`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        # Gemma 4's full layers with attention_k_eq_v: no v_proj, the values are k_proj's output
        self.values_from_keys = cfg.values_from_keys and self.sliding_window is None
        # Gemma 4's shared key/value layers: queries only, keys and values from layer kv_source (which returns them
        # beside its output when kv_stored; generation reads them from its cache)
        self.kv_source, self.kv_stored = cfg.kv_source(layer_idx), cfg.kv_stored(layer_idx)
        if self.kv_source is not None:
            self.q_proj = nn.Linear(h, self.q_size, bias=cfg.attn_bias)
        elif cfg.fused_qkv:
            self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attn_bias)
        else:
            # Qwen3.5: q_proj yields each head's query then its output gate (head_dim channels each)
            self.q_proj = nn.Linear(h, self.q_size * (2 if cfg.attn_output_gate else 1), bias=cfg.attn_bias)
            self.k_proj = nn.Linear(h, self.kv_size, bias=cfg.attn_bias)
            if not self.values_from_keys:
                self.v_proj = nn.Linear(h, self.kv_size, bias=cfg.attn_bias)
        self.o_name = cfg.module_name("o_proj")
        setattr(self, self.o_name, nn.Linear(self.q_size, h, bias=cfg.o_bias))
        # q/k norms by transformers' names: per head (Qwen3, Gemma 3; Hunyuan's after RoPE), or over the whole
        # projection (OLMo 2/3)
        self.qk_norm_names = ("query_layernorm", "key_layernorm") if cfg.qk_norm_after_rope else \
            (cfg.module_name("q_norm"), cfg.module_name("k_norm"))
        if cfg.qk_norm:
            q_dim, k_dim = (self.q_size, self.kv_size) if cfg.qk_norm_full else (d, d)
            if cfg.centered_norm:  # Command R+'s LayerNorms: a weight per head, (heads, head_dim)
                q_dim, k_dim = (cfg.num_heads, d), (cfg.num_kv_heads, d)
            setattr(self, self.qk_norm_names[0], RMSNorm(q_dim, cfg.rms_norm_eps, cfg.norm_offset,
                                                         cfg.norm_scale_fp32, cfg.centered_norm))
            if self.kv_source is None:
                setattr(self, self.qk_norm_names[1], RMSNorm(k_dim, cfg.rms_norm_eps, cfg.norm_offset,
                                                             cfg.norm_scale_fp32, cfg.centered_norm))
        if cfg.attn_sinks:
            self.sinks = nn.Parameter(torch.empty(cfg.num_heads))
        if cfg.attn_head_gate:  # LFM3: one sigmoid gate per head, from the layer's input
            self.g_proj = nn.Linear(h, cfg.num_heads, bias=False)
        self.rope_kind = "local" if cfg.rope_local_theta is not None and self.sliding_window else "global"
        if cfg.rope_layers and not cfg.rope_layers[layer_idx]:
            self.rope_kind = "none"  # SmolLM3's NoPE layers: identity cos/sin for the fused decode kernel
        # Whether "offload" may keep q/k/v and the post-attention residual so the recompute skips the projections
        # (models/kept_block.py): only where no other op reads the values skipped.
        self.keeps_block = not (cfg.fused_qkv or cfg.qk_norm or cfg.attn_sinks or cfg.sandwich_norm or cfg.post_norm
                                or cfg.value_norm or cfg.parallel_block)
        # Adjacent-pair RoPE (rope_interleaved) as the usual half-split one on channels reordered evens-then-odds
        # inside the rotary part, in q and k alike: each pair lands at (j, j + rotary/2) and q.k is unchanged.
        self.reorder_pairs = cfg.rope_interleaved

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, shared_kv: tuple | None = None):
        """x (B, T, H); cos/sin (B, T, rotary_dim); mask: build_masks' dict (or {"varlen": spans}); cache: a
        KVCache to extend (generation). Returns (B, T, H); a layer whose keys and values a later one reuses
        (kv_stored) returns (output, k, v) outside generation, k and v (B, T, kv heads, head_dim) after their norms
        and RoPE, which that layer (kv_source) takes as shared_kv."""
        if self.kv_source is not None:
            return shared_kv_attention(self, x, cos, sin, mask, cache, shared_kv)
        b, t, _ = x.shape
        cfg = self.cfg
        block = kept_block() if self.keeps_block and cache is None else None
        replay = block is not None and block[2]  # a recompute with kept values: the base GEMMs are skipped
        if cfg.fused_qkv:
            q, k, v = one_linear(self.qkv_proj, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        elif self.values_from_keys:
            q, k = project(x, self.q_proj, self.k_proj, values_unused=replay)
            v = k
        else:
            q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj, values_unused=replay)
        gate = None
        if cfg.attn_output_gate:
            q, gate = q.view(b, t, cfg.num_heads, 2 * cfg.head_dim).chunk(2, dim=-1)
            q, gate = q.contiguous(), gate.reshape(b, t, self.q_size)
        elif cfg.attn_head_gate:  # (B, T, heads, 1): each head's output scaled by one gate
            gate = one_linear(self.g_proj, x)[..., None].expand(b, t, cfg.num_heads, cfg.head_dim)
        if cfg.qk_norm_full:
            q, k = self._qk_norms(q, k)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.value_norm:  # Gemma 4's RMSNorm without a weight (the checkpoint has none): a scale of ones
            v = rms_norm(v, v.new_ones(cfg.head_dim), cfg.rms_norm_eps)
        if cfg.qk_norm and not (cfg.qk_norm_full or cfg.qk_norm_after_rope):
            q, k = self._qk_norms(q, k)
        if self.reorder_pairs:
            order = pair_order(cfg.head_dim, cfg.rotary_dim, q.device)
            q, k = q.index_select(-1, order), k.index_select(-1, order)
        # a decode step: RoPE, cache write, attention in one kernel (not for norms that follow RoPE)
        if cache is not None and cache.slot is not None and not cfg.qk_norm_after_rope:
            step_mask = mask.get(self.sliding_window)
            sinks = self.sinks if cfg.attn_sinks else None
            if use_triton(q) and decode_attention_usable(q, step_mask, cfg.attn_logit_softcap, sinks):
                i = self.layer_idx
                if mask.get("query_scale") is not None:  # before RoPE here: a rotation is linear
                    q = q * mask["query_scale"]
                out = decode_attention(q, k, v, cos, sin, cache.keys[i], cache.values[i], cache.slot, step_mask,
                                       cfg.scaling)
                return one_linear(self.out_layer, _gated(out, gate))
        if self.rope_kind != "none":
            q, k = apply_rope_qk(q, k, cos, sin)
        if cfg.qk_norm_after_rope:
            q, k = self._qk_norms(q, k)
        if mask.get("query_scale") is not None:  # Ministral 3, after RoPE as transformers scales
            q = q * mask["query_scale"]
        if block is not None:
            keeper, slot, _ = block
            if replay:
                q, k, v = (keeper.substitute(slot, name, part) for name, part in (("q", q), ("k", k), ("v", v)))
            else:
                for name, part in (("q", q), ("k", k), ("v", v)):
                    keeper.keep(slot, name, part)
        out = self.attend(q, k, v, mask, cache, gate, values_unused=replay)
        return (out, k, v) if self.kv_stored and cache is None else out

    def attend(self, q, k, v, mask, cache: KVCache | None = None, gate=None, cached: bool = False,
               values_unused: bool = False):
        """Attention of q (B, T, heads, head_dim) over k, v (B, T, kv heads, head_dim: this step's, written to `cache`
        when given; cached=True: (B, kv heads, S, head_dim) read from a cache, see shared_kv_attention), then the
        output gate and o_proj: (B, T, H). values_unused: a recompute with the attention block kept, which needs
        only o_proj's graph (the layer takes the kept residual in place of x + o_proj(out))."""
        b, t = q.shape[:2]
        spans = mask.get("varlen")
        # packed rows on CUDA: one flash-attention sequence per document (unless this layer's heads are too wide and
        # it has a dense mask beside the spans)
        if spans is not None and not cached and self.sliding_window not in mask:
            out = varlen_attention(q, k, v, spans, self.sliding_window, self.cfg.scaling)
            return project(_gated(out.reshape(b, t, self.q_size), gate), self.out_layer,
                           values_unused=values_unused)[0]
        q = q.transpose(1, 2)
        if not cached:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attention(q, k, v, mask.get(self.sliding_window), self.cfg.scaling, self.cfg.attn_logit_softcap,
                        self.sinks if self.cfg.attn_sinks else None)
        out = _gated(out.transpose(1, 2).reshape(b, t, self.q_size), gate)
        if values_unused:
            return project(out, self.out_layer, values_unused=True)[0]
        return one_linear(self.out_layer, out)

    @property
    def out_layer(self) -> nn.Module:
        """The output projection (o_proj, or the family's name for it)."""
        return getattr(self, self.o_name)


    def _qk_norms(self, q, k):
        """(q_norm(q), k_norm(k)) under the family's names (qk_norm_names)."""
        return getattr(self, self.qk_norm_names[0])(q), getattr(self, self.qk_norm_names[1])(k)


def _gated(out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The attention output times sigmoid(gate) (Qwen3.5's per-channel output gate, LFM3's per-head one expanded over
    the head's channels; in the model dtype), or as it is."""
    return out if gate is None else out * torch.sigmoid(gate.reshape(out.shape))


def one_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), as one matrix-vector kernel in a batch-1 decode step (kernels/gemv.py; plain Linears only)."""
    if one_row_linears(x, (layer,)):
        return gemv(x, [layer.weight], [layer.bias])[0]
    return layer(x)
