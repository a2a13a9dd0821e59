"""The one decoder: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3 — family quirks are ModelConfig fields.

Module and parameter names mirror transformers' (`model.layers.0.self_attn.q_proj.weight`), so HF state dicts
load without renaming and adapters use PEFT's key names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fasttune.kernels.activations import gated_act
from fasttune.kernels.cross_entropy import chunked_linear_cross_entropy, logits_from_hidden
from fasttune.kernels.rmsnorm import rms_norm
from fasttune.kernels.rope import apply_rope, rope_cos_sin, rope_inv_freq
from fasttune.models.config import ModelConfig


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # sum of target-token losses (for gradient-accumulation normalisation)
    num_targets: int | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        # Gemma stores w with the scale (1 + w), so its neutral weight is 0.
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attn_bias)
        else:
            self.q_proj = nn.Linear(h, self.q_size, bias=cfg.attn_bias)
            self.k_proj = nn.Linear(h, self.kv_size, bias=cfg.attn_bias)
            self.v_proj = nn.Linear(h, self.kv_size, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.q_size, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        cfg = self.cfg
        if cfg.fused_qkv:
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        out = attention(q, k, v, mask.get(self.sliding_window), cfg.scaling, cfg.attn_logit_softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.q_size))


def attention(q, k, v, mask, scale: float, softcap: float | None):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D); mask: None (plain causal) or bool (B, 1, T, T), True = attend."""
    if softcap:
        # Softcapping acts on the scores themselves, which SDPA cannot do: exact eager path (Gemma 2).
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is None:
            t = q.shape[2]
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.act, self.fused = cfg.hidden_act, cfg.fused_gate_up
        if self.fused:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(gated_act(gate, up, self.act))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(self, x, cos, sin, mask):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        if self.sandwich:  # Gemma 2: norm after attention and around the MLP
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class CausalLM(nn.Module):
    """Our decoder. `forward(input_ids, attention_mask, position_ids, labels)` returns loss and/or logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing: str | bool = False
        self._inv_freq: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def save_pretrained(self, folder, tokenizer=None, **_):
        """A LoRA model writes its PEFT adapter; a fully fine-tuned model writes a transformers checkpoint."""
        from fasttune.export.merged import save_merged

        method = "lora" if getattr(self, "lora_settings", None) is not None else "merged_16bit"
        return save_merged(self, folder, tokenizer, save_method=method)

    def save_pretrained_merged(self, folder, tokenizer=None, save_method: str = "merged_16bit", **_):
        from fasttune.export.merged import save_merged

        return save_merged(self, folder, tokenizer, save_method=save_method)

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def inv_freq(self, device) -> torch.Tensor:
        if device not in self._inv_freq:
            c = self.config
            self._inv_freq[device] = rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_scaling).to(device)
        return self._inv_freq[device]

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, inputs_embeds=None):
        cfg = self.config
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = x.to(self.dtype)
        b, t = x.shape[:2]
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if position_ids is None:
            position_ids = torch.arange(t, device=x.device).expand(b, t)
        cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids, x.dtype)
        masks = build_masks(attention_mask, t, x.device, set(cfg.sliding_windows))
        for layer in self.model.layers:
            x = self._run_layer(layer, x, cos, sin, masks)
        return self.model.norm(x)

    def _run_layer(self, layer, x, cos, sin, masks):
        mode = self.gradient_checkpointing
        if not (mode and self.training and torch.is_grad_enabled()):
            return layer(x, cos, sin, masks)
        if mode == "offload":
            # Saved layer inputs go to (pinned) CPU memory and come back for the recompute in backward.
            with torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda):
                return checkpoint(layer, x, cos, sin, masks, use_reentrant=False)
        return checkpoint(layer, x, cos, sin, masks, use_reentrant=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_from_hidden(hidden, self.lm_head.weight, self.config.final_logit_softcap)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, return_logits: bool | None = None, inputs_embeds=None, **_):
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)
        out = CausalLMOutput()
        if labels is None or return_logits:
            out.logits = self.logits(hidden)
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1)
            out.loss_sum = chunked_linear_cross_entropy(
                hidden[:, :-1].reshape(-1, hidden.shape[-1]), self.lm_head.weight, shifted,
                self.config.final_logit_softcap)
            out.num_targets = int((shifted != -100).sum())
            denom = num_items_in_batch if num_items_in_batch is not None else max(out.num_targets, 1)
            out.loss = out.loss_sum / denom
        return out


def build_masks(attention_mask, t: int, device, windows: set) -> dict:
    """Boolean (B, 1, T, T) masks per sliding-window size (None = full causal); {None: None} means plain causal."""
    if attention_mask is None and windows == {None}:
        return {None: None}
    i = torch.arange(t, device=device)
    causal = i[None, :] <= i[:, None]
    masks = {}
    for w in windows:
        allowed = causal if w is None else causal & (i[:, None] - i[None, :] < w)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
            # A padding query that may see nothing would give NaN in softmax; let it see itself (its output is unused).
            allowed = allowed | torch.eye(t, dtype=torch.bool, device=device)
        masks[w] = allowed
    return masks
