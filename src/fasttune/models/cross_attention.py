"""Llama 3.2 Vision's cross-attention layers (transformers' MllamaCrossAttentionDecoderLayer /
MllamaTextCrossAttention): the text's queries attend to the image features instead of to the text. The decoder
(models/decoder.py) runs them in place of a self-attention layer at the config's cross_attention_layers; what they
read comes in `CrossInputs` (in the masks dict every layer gets), and in generation the image's keys and values stay
in the KV cache (`KVCache.cross`), computed once at the prefill.

transformers' rule, which this keeps so that the values equal the reference's: a text position that may attend to
no image tile (text before the first image, a row without images) attends to every image position of its row with
equal weight, padding included (its mask row is all zeros, not all -inf), and its MLP output is zeroed; the layer
output is residual + tanh(gate) x sublayer for both sublayers. Packed rows (segment_ids) give each document what it
gets alone: its spans end with it, its text before its first image opens to its own images only, and a document
without images is left as it is (as the layer skips a batch without images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fasttune.models.attention import attention
from fasttune.models.config import ModelConfig
from fasttune.models.kv_cache import KVCache
from fasttune.models.norm import RMSNorm
from fasttune.peft.lora import project
from fasttune.sharding import is_sharded, join_unused


@dataclass
class CrossInputs:
    """What the cross-attention layers read for one forward pass.

    states: (B, V, H) the projected image features (V = images x tiles x patches per tile), or None in a decode
    step (the cache holds their keys and values); allowed: (B, 1, T, V) bool, True where a text position attends an
    image position (rows with none allowed already opened to every position, transformers' rule); rows: (B, T, 1) in
    the model dtype, 1 where a text position has an image to attend (its MLP output kept), else 0; attend: None, or
    for packed rows (B, T, 1) in the model dtype, 0 where a position's document has no image (the layer then leaves
    it as it is, as it skips a batch without images), else 1."""
    states: torch.Tensor | None
    allowed: torch.Tensor
    rows: torch.Tensor
    attend: torch.Tensor | None = None

    def last(self) -> "CrossInputs":
        """The last position's mask and row flag without the states: what each decode step after the prompt uses
        (transformers repeats the prompt's last mask row for every new token)."""
        return CrossInputs(None, self.allowed[:, :, -1:], self.rows[:, -1:],
                           None if self.attend is None else self.attend[:, -1:])

    def select(self, rows: torch.Tensor) -> "CrossInputs":
        """These inputs for batch rows `rows` (B',) int64 (copies of a prompt in generation)."""
        pick = lambda x: None if x is None else x.index_select(0, rows)  # noqa: E731
        return CrossInputs(pick(self.states), pick(self.allowed), pick(self.rows), pick(self.attend))


def cross_inputs(states: torch.Tensor, tile_mask: torch.Tensor, patches: int, dtype: torch.dtype,
                 own_images: torch.Tensor | None = None) -> CrossInputs:
    """CrossInputs from the projected features (B, V, H) and the processor's cross_attention_mask (B, T, images,
    tiles), 1 where a text position attends an image's tile; each tile stands for `patches` image positions
    (transformers' _prepare_cross_attention_mask, as a bool mask). own_images (B, T, images) bool, for packed rows:
    the images of each position's document; a position attending none then opens to its own document's images (every
    tile) instead of the row's, and one whose document has none is left as it is (CrossInputs.attend)."""
    def positions(mask: torch.Tensor) -> torch.Tensor:
        """A per-tile mask (B, T, images, tiles) -> a bool mask over the image positions (B, 1, T, V): each tile's
        value repeated for its `patches` positions."""
        return mask.bool().repeat_interleave(patches, dim=3).flatten(2)[:, None]

    allowed = positions(tile_mask)
    any_allowed = allowed.any(dim=-1, keepdim=True)
    rows = any_allowed[:, 0].to(dtype)  # (B, T, 1)
    if own_images is None:
        return CrossInputs(states, allowed | ~any_allowed, rows)
    own = positions(own_images[..., None].expand(*own_images.shape, tile_mask.shape[-1]))
    has_own = own.any(dim=-1, keepdim=True)
    opened = torch.where(has_own, own, torch.ones_like(own))  # (no image of its own: any keys; attend 0 drops them)
    return CrossInputs(states, allowed | (~any_allowed & opened), rows, has_own[:, 0].to(dtype))


def image_token_spans(input_ids: torch.Tensor, image_token_id: int, tiles: torch.Tensor,
                      max_tiles: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The processor's cross_attention_mask (B, T, images, max_tiles) long, from the token ids: the k-th <|image|>
    of a row is attended from its position to the next <|image|> (or the row's end), a run of adjacent <|image|>
    tokens sharing the span after the run's last one, over the image's first tiles[b, k] tiles (transformers'
    get_cross_attention_token_mask and convert_sparse_cross_attention_mask_to_dense). input_ids (B, T); tiles
    (B, images) long; segment_ids (B, T) long, packed rows' documents: a span also ends with its document, so each
    document's text attends its own images only, and its text before them none (as alone)."""
    b, t = input_ids.shape
    images = tiles.shape[1]
    pos = torch.arange(t, device=input_ids.device)
    hit = input_ids == image_token_id
    run_start = hit.clone()
    run_start[:, 1:] &= ~hit[:, :-1]
    # After each position, the next run's first token (or t): a span ends there, so a run's tokens share one end.
    after = torch.where(run_start, pos, t)[:, 1:]
    following = torch.cat([after, after.new_full((b, 1), t)], dim=1).flip(1).cummin(dim=1).values.flip(1)
    rows, cols = hit.nonzero(as_tuple=True)
    rank = (hit.cumsum(dim=1) - 1)[rows, cols]
    keep = rank < images  # only the first `images` <|image|> tokens of a row get a span
    starts = torch.full((b, images), t, dtype=torch.long, device=input_ids.device)
    starts[rows[keep], rank[keep]] = cols[keep]
    ends = following.gather(1, starts.clamp(max=t - 1))
    if segment_ids is not None:  # each position's document's end: the next position of another document (or t)
        boundary = torch.where(segment_ids[:, 1:] != segment_ids[:, :-1], pos[1:], t)
        doc_end = torch.cat([boundary, boundary.new_full((b, 1), t)], dim=1).flip(1).cummin(dim=1).values.flip(1)
        ends = torch.minimum(ends, doc_end.gather(1, starts.clamp(max=t - 1)))
    spans = (pos[None, :, None] >= starts[:, None, :]) & (pos[None, :, None] < ends[:, None, :])  # (B, T, images)
    tile_on = torch.arange(max_tiles, device=input_ids.device) < tiles[..., None]  # (B, images, max_tiles)
    return (spans[..., None] & tile_on[:, None]).long()


class CrossAttention(nn.Module):
    """One layer's cross-attention (`cross_attn`, transformers' names): q_proj on the text, k_proj / v_proj on the
    image features, per-head q_norm / k_norm, no RoPE, o_proj; grouped key/value heads as the text's."""

    keeps_block = False  # ("offload" keeps no q/k/v of this layer: models/kept_block.py)
    rope_kind = "global"  # (the decoder passes cos / sin, unused here)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cross: CrossInputs, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, H) normed text -> (B, T, H). The image keys / values come from cross.states (and go to `cache`
        when given), or, when states is None, from `cache` (a decode step)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_norm(project(x, self.q_proj)[0].view(b, t, cfg.num_heads, cfg.head_dim)).transpose(1, 2)
        if cross.states is not None:
            s = cross.states
            k, v = project(s, self.k_proj, self.v_proj)
            k = self.k_norm(k.view(b, -1, cfg.num_kv_heads, cfg.head_dim)).transpose(1, 2)
            v = v.view(b, -1, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            if cache is not None:
                cache.cross[self.layer_idx] = (k, v)
        else:
            k, v = cache.cross[self.layer_idx]
        out = attention(q, k, v, cross.allowed, cfg.head_dim ** -0.5, None)
        return project(out.transpose(1, 2).reshape(b, t, -1), self.o_proj)[0]


def cross_layer(layer, x: torch.Tensor, masks: dict, cache: KVCache | None = None) -> torch.Tensor:
    """A cross-attention decoder layer (DecoderLayer with `is_cross`) on x (B, T, H): x + tanh(attention gate) x
    cross_attn(input_layernorm(x)), then + tanh(MLP gate) x rows x mlp(post_attention_layernorm(...)). Without image
    features (masks["cross"] None and none cached) the layer is skipped, as transformers skips it."""
    cross = masks.get("cross")
    if cross is None or (cross.states is None and (cache is None or layer.layer_idx not in cache.cross)):
        # (Under FSDP another rank's batch may have images: this rank still sends the layer's zero gradients.)
        return join_unused(x, [layer]) if torch.is_grad_enabled() and is_sharded(layer) else x
    h = layer.cross_attn(layer.attn_norm(x), cross, cache)
    if cross.attend is not None:  # (packed rows: a document without images is left as it is)
        h = h * cross.attend
    x = x + torch.tanh(layer.cross_attn_attn_gate) * h
    h = layer.ffn(layer.mlp_norm(x)) * cross.rows
    return x + torch.tanh(layer.cross_attn_mlp_gate) * h
