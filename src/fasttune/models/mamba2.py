"""The Mamba-2 token mixer of hybrid decoders (Granite 4.0's, transformers' GraniteMoeHybridMambaLayer / BambaMixer,
under their module and parameter names): in_proj gives the gate z, the conv input x|B|C and the step dt; a causal
depthwise conv1d with bias and SiLU runs over x|B|C; the selective scan (models/ssd.py) with
dt = clamp(softplus(dt + dt_bias), time_step_limit) and A = -exp(A_log), plus the D skip; an RMSNorm of
y * SiLU(z) over each group's channels (`norm`, Mamba-2's norm_before_gate=False); out_proj.

Padding and packing as in models/gated_deltanet.py: padded positions (a 0 in the attention mask) enter as zeros, and
the conv's output is zeroed there again, as transformers' `apply_mask_to_padding_states` does before in_proj and after
the conv; packed documents (segment ids) each start from a zero state and a zero conv history.
Generation keeps per layer the conv's last d_conv - 1 inputs (B, conv channels, d_conv - 1) and the scan state
(B, heads, head_dim, d_state) fp32 in the KVCache, updated in place by each decode step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttune.kernels.gated_rmsnorm import gated_rms_norm
from fasttune.models.config import ModelConfig
from fasttune.models.gated_deltanet import causal_conv, conv_step, last_positions
from fasttune.models.ssd import ssd_scan, ssd_step
from fasttune.peft.lora import project


class GroupedGatedRMSNorm(nn.Module):
    """RMSNorm of x * SiLU(gate) over each of `groups` equal channel groups (transformers'
    GraniteMoeHybridRMSNormGated): fp32 math, w times the result. before_gate: the RMSNorm of x, times w, then times
    SiLU(gate) (Falcon-H1's mamba_norm_before_gate). kernels/gated_rmsnorm.py computes it (Triton on the GPU)."""

    def __init__(self, dim: int, groups: int, eps: float, before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps, self.before_gate = groups, eps, before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x, gate (..., dim) -> (..., dim) in out_dtype (transformers returns fp32 and casts before out_proj: the
        same values; the kernel writes out_proj's input dtype directly)."""
        return gated_rms_norm(x, gate, self.weight, self.groups, self.eps, self.before_gate, out_dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba-2 mixer (see the module docstring); layer `layer_idx` of a hybrid decoder."""

    rope_kind = "global"  # the layer loop hands every mixer a RoPE table; this one ignores it
    keeps_block = False  # "offload" keeps no projections of this layer (models/kept_block.py)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        h, k = cfg.hidden_size, cfg.linear_conv_kernel
        self.heads, self.head_dim = cfg.mamba_heads, cfg.mamba_head_dim
        self.groups, self.state_size = cfg.mamba_groups, cfg.mamba_state
        self.inner = self.heads * self.head_dim
        self.conv_dim = self.inner + 2 * self.groups * self.state_size
        self.time_step_limit = cfg.time_step_limit
        self.in_proj = nn.Linear(h, self.inner + self.conv_dim + self.heads, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim, bias=cfg.conv_bias,
                                padding=k - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.heads))
        if cfg.mamba_rms_norm:  # (Falcon-H1 without it: y * SiLU(z))
            self.norm = GroupedGatedRMSNorm(self.inner, self.groups, cfg.rms_norm_eps, cfg.mamba_norm_before_gate)
        self.out_proj = nn.Linear(self.inner, h, bias=cfg.mamba_proj_bias)
        # Falcon-H1's µP: the input times ssm_in_multiplier, in_proj's z / x / B / C / dt sections times theirs
        self.in_multiplier = cfg.parallel_multipliers[2] if cfg.parallel_mamba else 1.0
        self.section_multipliers = cfg.ssm_multipliers
        self._sections: dict = {}

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, H) -> (B, T, H). mask: the decoder's mask dict, read for "padding" (attention mask (B, T), 0 =
        padding), "segments" (packed document ids (B, T)) and "spans" (their runs); cache: a KVCache (prefill fills
        this layer's conv history and state, a decode step (cache.slot set) reads and updates them)."""
        b, t, _ = x.shape
        padding, segments = mask.get("padding"), mask.get("segments")
        keep = None if padding is None else padding[:, -t:, None]
        if keep is not None:
            x = (x * keep).to(x.dtype)
        if self.in_multiplier != 1.0:
            x = x * self.in_multiplier
        projected = project(x, self.in_proj)[0]
        if self.section_multipliers is not None:
            projected = projected * self._section_scale(projected)
        z, xbc, dt = projected.split([self.inner, self.conv_dim, self.heads], dim=-1)
        weight, bias = self.conv1d.weight, self.conv1d.bias
        step = cache is not None and cache.slot is not None
        if step:
            xbc = conv_step(xbc, cache.conv[self.layer_idx], weight, bias)
        else:
            if cache is not None:
                cache.conv[self.layer_idx].copy_(last_positions(xbc, self.conv1d.kernel_size[0] - 1))
            xbc = causal_conv(xbc, weight, segments, bias)
        if keep is not None:
            xbc = (xbc * keep).to(xbc.dtype)
        xs, B, C = xbc.split([self.inner, self.groups * self.state_size, self.groups * self.state_size], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -self.A_log.float().exp()
        if step:  # (transformers' decode update applies no time_step_limit)
            y = ssd_step(xs.view(b, self.heads, self.head_dim), dt[:, 0], A, B.view(b, self.groups, -1),
                         C.view(b, self.groups, -1), self.D, cache.recurrent[self.layer_idx])[:, None]
        else:
            low, high = self.time_step_limit
            if low > 0.0 or high < float("inf"):
                dt = dt.clamp(low, high)
            y, state = ssd_scan(xs.view(b, t, self.heads, self.head_dim), dt, A, B.view(b, t, self.groups, -1),
                                C.view(b, t, self.groups, -1), self.D, mask.get("spans"),
                                final_state=cache is not None)
            if cache is not None:
                cache.recurrent[self.layer_idx].copy_(state)
        y = y.reshape(b, t, self.inner)
        y = self.norm(y, z, x.dtype) if hasattr(self, "norm") else (y * F.silu(z.float())).to(x.dtype)
        return project(y, self.out_proj)[0]

    def _section_scale(self, like: torch.Tensor) -> torch.Tensor:
        """Falcon-H1's per-channel µP scale of in_proj's output (transformers' compute_mup_vector): z, x, B, C, dt
        sections times ssm_multipliers, in like's dtype and device (built once per both)."""
        key = (like.device, like.dtype)
        if key not in self._sections:
            sizes = (self.inner, self.inner, self.groups * self.state_size, self.groups * self.state_size, self.heads)
            scale = torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, self.section_multipliers)])
            self._sections[key] = scale.to(device=like.device, dtype=like.dtype)
        return self._sections[key]
