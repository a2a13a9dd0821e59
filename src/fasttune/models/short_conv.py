"""LFM2's short-convolution token mixer (transformers' Lfm2ShortConv, under its module and parameter names): in_proj
gives three hidden-size parts (B, C, x); B * x runs through a causal depthwise conv of conv_L_cache taps with no
activation; C times the result goes through out_proj.

Padding and packing as in models/gated_deltanet.py: padded positions (a 0 in the attention mask) enter as zeros, as
transformers' `apply_mask_to_padding_states` does; packed documents (segment ids) each start with a zero conv
history. Generation keeps per layer the conv's last conv_L_cache - 1 inputs in the KVCache (`cache.conv`), updated
in place by each decode step.
"""
from __future__ import annotations

import torch.nn as nn

from fasttune.models.config import ModelConfig
from fasttune.models.gated_deltanet import causal_conv, conv_step, last_positions
from fasttune.peft.lora import project


class ShortConv(nn.Module):
    """One LFM2 short-convolution mixer (see the module docstring); layer `layer_idx` of an LFM2 decoder."""

    rope_kind = "global"  # the layer loop hands every mixer a RoPE table; this one ignores it
    keeps_block = False  # "offload" keeps no projections of this layer (models/kept_block.py)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        h, k = cfg.hidden_size, cfg.linear_conv_kernel
        self.conv = nn.Conv1d(h, h, k, groups=h, bias=cfg.conv_bias, padding=k - 1)
        self.in_proj = nn.Linear(h, 3 * h, bias=cfg.conv_bias)
        self.out_proj = nn.Linear(h, h, bias=cfg.conv_bias)

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, H) -> (B, T, H). mask: the decoder's mask dict, read for "padding" (attention mask (B, T), 0 =
        padding) and "segments" (packed document ids (B, T)); cache: a KVCache (prefill fills this layer's conv
        history, a decode step (cache.slot set) reads and updates it)."""
        t = x.shape[1]
        padding, segments = mask.get("padding"), mask.get("segments")
        if padding is not None:
            x = (x * padding[:, -t:, None]).to(x.dtype)
        gate_in, gate_out, h = project(x, self.in_proj)[0].chunk(3, dim=-1)
        h = gate_in * h
        weight, bias = self.conv.weight, self.conv.bias
        if cache is not None and cache.slot is not None:
            h = conv_step(h, cache.conv[self.layer_idx], weight, bias, silu=False)
        else:
            if cache is not None:
                cache.conv[self.layer_idx].copy_(last_positions(h, self.conv.kernel_size[0] - 1))
            h = causal_conv(h, weight, segments, bias, silu=False)
        return project(gate_out * h, self.out_proj)[0]
