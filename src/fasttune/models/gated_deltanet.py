"""Qwen3.5's linear-attention layer (transformers' Qwen3_5GatedDeltaNet, under its module and parameter names):
projections in_proj_qkv / in_proj_z / in_proj_b / in_proj_a (Qwen3-Next's Qwen3NextGatedDeltaNet: the same four
fused as in_proj_qkvz / in_proj_ba, grouped per key head), a causal depthwise conv1d with SiLU over q|k|v, the
gated delta rule (models/delta_rule.py) with beta = sigmoid(b) and log-decay g = -exp(A_log) * softplus(a + dt_bias),
an RMSNorm of each value head gated by SiLU(z), and out_proj.

Padding and packing: padded positions (a 0 in the attention mask) enter as zeros, as transformers'
`apply_mask_to_padding_states` does, which leaves the later tokens of a left-padded row as if unpadded; packed
documents (segment ids) each start from a zero state and a zero conv history.
Generation keeps per layer the last conv_kernel - 1 inputs of the conv and the (value heads, d_k, d_v) fp32 state
in the KVCache, updated in place by each decode step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttune.models.config import ModelConfig
from fasttune.models.delta_rule import delta_rule_step, gated_delta_rule, uses_fla
from fasttune.peft.lora import project


class GatedRMSNorm(nn.Module):
    """RMSNorm of x times SiLU(gate) (transformers' Qwen3_5RMSNormGated): w * norm(x) in x's dtype, times silu(gate)
    in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x, gate (..., dim) -> (..., dim) in x's dtype."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)
        return (h * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """One gated DeltaNet token mixer (see the module docstring); layer `layer_idx` of a Qwen3.5 decoder."""

    rope_kind = "global"  # the layer loop hands every mixer a RoPE table; this one ignores it
    keeps_block = False  # "offload" keeps no projections of this layer (models/kept_block.py)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        h = cfg.hidden_size
        self.key_heads, self.value_heads = cfg.linear_key_heads, cfg.linear_value_heads
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        keys, values = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        self.sizes = (keys, keys, values)
        channels = 2 * keys + values
        self.fused = cfg.linear_fused_projections
        if self.fused:  # Qwen3-Next: per key head [q, k, its value heads' v, their z], and [their b, their a]
            self.in_proj_qkvz = nn.Linear(h, 2 * keys + 2 * values, bias=False)
            self.in_proj_ba = nn.Linear(h, 2 * self.value_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(h, channels, bias=False)
            self.in_proj_z = nn.Linear(h, values, bias=False)
            self.in_proj_b = nn.Linear(h, self.value_heads, bias=False)
            self.in_proj_a = nn.Linear(h, self.value_heads, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, cfg.linear_conv_kernel, groups=channels,
                                padding=cfg.linear_conv_kernel - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.value_heads))
        self.A_log = nn.Parameter(torch.zeros(self.value_heads))
        self.norm = GatedRMSNorm(self.value_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(values, h, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, H) -> (B, T, H). mask: the decoder's mask dict, read for "padding" (attention mask (B, T), 0 =
        padding), "segments" (packed document ids (B, T)) and "spans" (their runs, segment_spans'); cache: a KVCache
        (prefill fills this layer's states, a decode step (cache.slot set) reads and updates them)."""
        b, t, _ = x.shape
        padding, segments = mask.get("padding"), mask.get("segments")
        if padding is not None:
            x = (x * padding[:, -t:, None]).to(x.dtype)
        if self.fused:
            qkv, z, beta, a = self._ungroup(*project(x, self.in_proj_qkvz, self.in_proj_ba))
        else:
            qkv, z, beta, a = project(x, self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a)
        step = cache is not None and cache.slot is not None
        if step:
            qkv = conv_step(qkv, cache.conv[self.layer_idx], self.conv1d.weight)
        else:
            if cache is not None:
                cache.conv[self.layer_idx].copy_(last_positions(qkv, self.conv1d.kernel_size[0] - 1))
            qkv = causal_conv(qkv, self.conv1d.weight, segments)
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.reshape(b, t, self.key_heads, self.key_dim)
        k = k.reshape(b, t, self.key_heads, self.key_dim)
        v = v.reshape(b, t, self.value_heads, self.value_dim)
        beta = beta.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        if step:
            o = delta_rule_step(q, k, v, g, beta, cache.recurrent[self.layer_idx])
        else:
            o, state = gated_delta_rule(q, k, v, g, beta, mask.get("spans"), final_state=cache is not None)
            if cache is not None:
                cache.recurrent[self.layer_idx].copy_(state)
        o = self.norm(o.reshape(-1, self.value_dim), z.reshape(-1, self.value_dim))
        return project(o.reshape(b, t, -1), self.out_proj)[0]

    def _ungroup(self, qkvz, ba):
        """Qwen3-Next's fused projections (B, T, ...) -> (q|k|v (B, T, 2 keys + values), z (B, T, values), b, a
        (B, T, value heads)) in Qwen3.5's layout, as transformers' fix_query_key_value_ordering splits them: each
        key head's group holds its q, k, then the v and z of its value heads, and b then a of those heads."""
        b, t, _ = qkvz.shape
        per = self.value_heads // self.key_heads
        groups = qkvz.view(b, t, self.key_heads, -1)
        q, k, v, z = groups.split([self.key_dim, self.key_dim, per * self.value_dim, per * self.value_dim], dim=-1)
        beta, a = ba.view(b, t, self.key_heads, 2 * per).split([per, per], dim=-1)
        qkv = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1)
        return qkv, z.reshape(b, t, -1), beta.reshape(b, t, -1), a.reshape(b, t, -1)

    @property
    def uses_fla(self) -> bool:
        """Whether this layer's delta rule runs flash-linear-attention's kernels (on CUDA when it is installed)."""
        return uses_fla(self.out_proj.weight)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, segments: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, silu: bool = True) -> torch.Tensor:
    """SiLU(causal depthwise conv1d) over time (silu=False: the conv alone, LFM2's): x (B, T, C), weight (C, 1, K),
    bias (C,) or None -> (B, T, C) in x's dtype. With segments (B, T), no output mixes inputs of two documents
    (each starts with a zero history)."""
    t, k = x.shape[1], weight.shape[-1]
    act = F.silu if silu else (lambda h: h)
    if segments is None:  # transformers' path: F.conv1d in the weight's dtype
        out = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight, bias, padding=k - 1, groups=x.shape[-1])[..., :t]
        return act(out).transpose(1, 2).to(x.dtype)
    xf, w = x.float(), weight[:, 0].float()
    out = xf * w[:, k - 1]
    for shift in range(1, min(k, t)):  # tap k - 1 - shift reads position t - shift, from the same document only
        same = (segments[:, shift:] == segments[:, :-shift])[..., None]
        out[:, shift:] += xf[:, :-shift] * w[:, k - 1 - shift] * same
    if bias is not None:
        out += bias.float()
    return act(out).to(x.dtype)


def conv_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              silu: bool = True) -> torch.Tensor:
    """One position x (B, 1, C) through causal_conv's conv, with the kept inputs `state` (B, C, K - 1) updated in
    place (transformers' causal_conv1d_update). weight (C, 1, K), bias (C,) or None. Returns (B, 1, C) in x's
    dtype."""
    window = torch.cat([state, x.transpose(1, 2).to(state.dtype)], dim=-1)  # (B, C, K)
    state.copy_(window[:, :, 1:])
    w = weight[:, 0]  # (C, K)
    out = (window.float() * w.float()).sum(-1, keepdim=True)
    if bias is not None:
        out = out + bias.float()[:, None]
    out = out.to(w.dtype)
    return (F.silu(out) if silu else out).transpose(1, 2).to(x.dtype)


def segment_spans(segments: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of equal ids in segments (B, T), row by row, covering every position."""
    cut = torch.ones_like(segments, dtype=torch.bool)
    cut[:, 1:] = segments[:, 1:] != segments[:, :-1]
    rows, starts = cut.nonzero(as_tuple=True)
    rows, starts = rows.tolist(), starts.tolist()
    t = segments.shape[1]
    return [(r, s, starts[i + 1] if i + 1 < len(rows) and rows[i + 1] == r else t)
            for i, (r, s) in enumerate(zip(rows, starts))]


def last_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n positions of x (B, T, C) as (B, C, n), zeros in front when T < n (the conv's kept inputs)."""
    tail = x[:, -n:].transpose(1, 2)
    return F.pad(tail, (n - tail.shape[-1], 0)) if tail.shape[-1] < n else tail
