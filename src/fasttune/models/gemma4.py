"""Gemma 4's E2B / E4B and 26B-A4B parts on the decoder (transformers' Gemma4TextModel / Gemma4TextDecoderLayer):
per-layer embeddings (PLE), the layers that reuse an earlier layer's keys and values, and routed experts beside the
dense MLP.

- **Per-layer embeddings.** Beside the main embedding, a second table (`embed_tokens_per_layer`, per_layer_vocab_size
  x layers * P, times sqrt(P)) gives each token P channels per layer; `per_layer_model_projection` of the (scaled)
  main embedding, times hidden ** -0.5 and normed per layer (`per_layer_projection_norm`), is added and the sum
  scaled by 2 ** -0.5 (`per_layer_inputs`). After its MLP, layer i adds
  post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(x)) * input_i)) (`add_per_layer_input`).
- **Shared keys and values.** The last num_kv_shared_layers layers project queries only and attend over the keys and
  values of the last earlier layer of their kind (ModelConfig.kv_source): in training those come with that layer's
  output (they are outputs of its recompute too, so their gradients reach its projections); in generation they are
  read from its cache, which the shared layers never write (`shared_kv_attention`).
- **Experts beside the MLP** (26B-A4B): every layer keeps its dense MLP and adds top-k of E experts (models/moe.py's
  stacked Experts, `layers.N.experts`), routed on the residual stream by `Gemma4Router`; the two outputs are normed
  separately and summed before the post-feedforward norm (`add_experts`). Transformers computes no load-balancing
  loss for Gemma 4, and neither does this.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fasttune.errors import ConfigError
from fasttune.kernels.activations import gated_act
from fasttune.kernels.rmsnorm import rms_norm
from fasttune.kernels.rope import apply_rope_reference
from fasttune.models.moe import Experts, Router, route


def build_per_layer_tables(model: nn.Module, cfg, norm_factory) -> None:
    """Give the backbone `model` Gemma 4's per-layer-embedding modules under transformers' names (see module
    docstring); norm_factory(dim) builds an RMSNorm."""
    width = cfg.num_layers * cfg.per_layer_input_size
    model.embed_tokens_per_layer = nn.Embedding(cfg.per_layer_vocab_size, width)
    model.per_layer_model_projection = nn.Linear(cfg.hidden_size, width, bias=False)
    model.per_layer_projection_norm = norm_factory(cfg.per_layer_input_size)


def build_per_layer_input(layer: nn.Module, cfg, norm_factory) -> None:
    """Give decoder layer `layer` its per-layer-input gate, projection and norm (transformers' names)."""
    layer.per_layer_input_gate = nn.Linear(cfg.hidden_size, cfg.per_layer_input_size, bias=False)
    layer.per_layer_projection = nn.Linear(cfg.per_layer_input_size, cfg.hidden_size, bias=False)
    layer.post_per_layer_input_norm = norm_factory(cfg.hidden_size)


def per_layer_inputs(model: nn.Module, input_ids: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """(B, T, layers, P) per-layer inputs from input_ids (B, T) and the scaled main embeddings (B, T, H), as
    transformers' get_per_layer_inputs + project_per_layer_inputs compute them. Raises ConfigError without
    input_ids (transformers recovers them by matching the embeddings; pass the ids instead)."""
    if input_ids is None:
        raise ConfigError("This Gemma 4 model has per-layer embeddings, which are looked up by token id: call it "
                          "with input_ids, not inputs_embeds.")
    cfg = model.arch
    b, t = input_ids.shape
    table = model.embed_tokens_per_layer
    scale = torch.tensor(math.sqrt(cfg.per_layer_input_size), dtype=table.weight.dtype)
    tokens = (table(input_ids) * scale).reshape(b, t, cfg.num_layers, cfg.per_layer_input_size)
    projected = model.per_layer_model_projection(embeds) * cfg.hidden_size ** -0.5
    projected = model.per_layer_projection_norm(projected.reshape(b, t, cfg.num_layers, cfg.per_layer_input_size))
    return (projected + tokens) * 2 ** -0.5


def add_per_layer_input(layer: nn.Module, x: torch.Tensor, per_layer_input: torch.Tensor, act: str) -> torch.Tensor:
    """x (B, T, H) plus the layer's per-layer-input branch for per_layer_input (B, T, P), `act` the model's
    activation (transformers' Gemma4TextDecoderLayer, after the MLP's residual add)."""
    gated = gated_act(layer.per_layer_input_gate(x), per_layer_input.to(x.dtype).contiguous(), act)
    return x + layer.post_per_layer_input_norm(layer.per_layer_projection(gated))


def shared_kv_attention(attn: nn.Module, x, cos, sin, mask, cache, shared_kv):
    """A shared key/value layer's attention (Attention with kv_source set): its queries (q_proj, q_norm, RoPE)
    over shared_kv = (k, v) (B, T, kv heads, head_dim) from layer kv_source in training, or over that layer's cache
    in generation (written by it earlier in the same step). Returns (B, T, H)."""
    cfg = attn.cfg
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim)
    q = getattr(attn, attn.qk_norm_names[0])(q) if cfg.qk_norm else q
    q = apply_rope_reference(q, cos, sin)
    if cache is None:
        if shared_kv is None:
            raise RuntimeError(f"layer {attn.layer_idx} reuses layer {attn.kv_source}'s keys and values, which were "
                               f"not passed")
        return attn.attend(q, *shared_kv, mask)
    end = cache.read_len if cache.slot is not None else cache.written  # (this step's positions included)
    src = attn.kv_source
    return attn.attend(q, cache.keys[src][:, :, :end], cache.values[src][:, :, :end], mask, cached=True)


class Gemma4Router(nn.Module):
    """Gemma 4's router (transformers' Gemma4TextRouter): the layer's residual stream normed without a weight, times
    `scale` (H,) and hidden ** -0.5, through `proj` (E, H); softmax (fp32) top-k renormalised, each weight then times
    its expert's `per_expert_scale`. forward: x (N, H) -> (weights (N, k) fp32, experts (N, k) int64, logits (N, E))."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = Router(cfg.hidden_size, cfg.num_experts)  # (not an nn.Linear: neither quantised nor a LoRA target)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.eps, self.top_k = cfg.rms_norm_eps, cfg.num_experts_per_tok

    def forward(self, x: torch.Tensor):
        """x (N, H) the residual stream -> (weights (N, k) fp32, experts (N, k) int64, logits (N, E))."""
        h = rms_norm(x, x.new_ones(x.shape[-1]), self.eps) * self.scale.to(x.dtype) * x.shape[-1] ** -0.5
        logits = self.proj(h)
        weights, experts = route(logits, self.top_k, True)
        return weights * self.per_expert_scale[experts], experts, logits


def build_experts(layer: nn.Module, cfg, norm_factory) -> None:
    """Give decoder layer `layer` Gemma 4's routed experts beside its dense MLP (transformers' names: `router`,
    `experts`, pre_feedforward_layernorm_2, post_feedforward_layernorm_1 / _2)."""
    layer.router = Gemma4Router(cfg)
    layer.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
    for name in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
        setattr(layer, name, norm_factory(cfg.hidden_size))


def add_experts(layer: nn.Module, residual: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The MLP part of a Gemma 4 MoE layer before its post-feedforward norm: post_feedforward_layernorm_1(dense) +
    post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(residual))), routed on the residual stream
    (B, T, H) itself; dense (B, T, H) the dense MLP's output."""
    flat = residual.reshape(-1, residual.shape[-1])
    weights, experts, _ = layer.router(flat)
    routed = layer.experts(layer.pre_feedforward_layernorm_2(flat), weights, experts).view(residual.shape)
    return layer.post_feedforward_layernorm_1(dense) + layer.post_feedforward_layernorm_2(routed)


def last_position(x: torch.Tensor, ple, ropes: dict, masks: dict):
    """The inputs of the remaining layers cut to the last position (B, 1, ...): hidden states x (B, T, H), per-layer
    inputs (B, T, layers, P) or None, RoPE tables {kind: (cos, sin) (B, T, d)} and the attention masks by window
    ((B, 1, T, S) or None, which stays None: one query over all keys needs no mask)."""
    ple = None if ple is None else ple[:, -1:]
    ropes = {kind: (cos[:, -1:], sin[:, -1:]) for kind, (cos, sin) in ropes.items()}
    masks = {key: (m[:, :, -1:] if isinstance(m, torch.Tensor) and (key is None or isinstance(key, int)) else m)
             for key, m in masks.items()}  # (the attention masks are keyed by their window)
    return x[:, -1:], ple, ropes, masks
