"""gpt-oss's MoE MLP on the grouped expert GEMMs of models/moe.py.

It differs from Qwen3-MoE's and Mixtral's block in ways that are all in the weights and the activation, so it
keeps transformers' own names and layouts (`mlp.router.weight` / `.bias`, `mlp.experts.gate_up_proj` (E, H, 2I),
`gate_up_proj_bias` (E, 2I), `down_proj` (E, I, H), `down_proj_bias` (E, H); source: transformers'
GptOssTopKRouter / GptOssExperts) and checkpoints, adapters and merged exports need no conversion:
- the router is a linear layer with bias; a token's weights are the softmax over its top-k logits;
- the expert weights are stored transposed (in, out), which is the operand the grouped GEMM takes as it is;
- gate and up are interleaved along gate_up_proj's output (gate = columns 0, 2, 4, ..., up = 1, 3, 5, ...);
- the activation is a clamped SwiGLU: gate <= limit, -limit <= up <= limit, (up + 1) * gate * sigmoid(alpha gate);
- each expert adds its biases after both GEMMs.
LoRA on the stacked weights is peft/lora.py's ExpertLora in PEFT's ParamWrapper layout for transposed experts
(lora_A (E*r, in), lora_B (out, r*E), out in the interleaved order), as two rank-r products per weight
(models/moe.py's expert_linear, which also adds the expert biases).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttune.kernels.clamped_swiglu import clamped_swiglu, clamped_swiglu_reference
from fasttune.kernels.moe_permute import group_by_expert, permute, unpermute
from fasttune.kernels.rebuild import mark_through
from fasttune.models.moe import expert_linear


def route_top_logits(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: the k largest logits and a softmax over those k (fp32). router_logits (N, E) -> (weights
    (N, k) fp32, experts (N, k) int64). (transformers' GptOssTopKRouter takes the softmax in the logits' dtype;
    in fp32 both are the same.)"""
    top, experts = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=torch.float32), experts


def gpt_oss_experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up_proj,
                            gate_up_bias: torch.Tensor, down_proj, down_bias: torch.Tensor, limit: float,
                            alpha: float, method: str = "auto", lora: dict | None = None) -> torch.Tensor:
    """sum_j weights[n, j] * (act(x_n @ Wgu_e + bgu_e) @ Wd_e + bd_e) for e = experts[n, j], as two grouped GEMMs
    over the (token, expert) pairs sorted by expert, without a loop over experts.

    x (N, H); weights (N, k) float; experts (N, k) int64; gate_up_proj (E, H, 2I), gate_up_bias (E, 2I),
    down_proj (E, I, H), down_bias (E, H) (transformers' layouts); act = clamped_swiglu(limit, alpha). lora:
    {"gate_up_proj" | "down_proj": (a (E, in, r), b (E, r, out), scaling)} (ExpertLora.factors). method: see
    models/moe.py's grouped_mm. Returns (N, H) in x's dtype."""
    lora = lora or {}
    groups = group_by_expert(experts, gate_up_bias.shape[0])
    offsets, counts = groups.offsets, groups.counts
    xs = mark_through(permute(x, groups), lambda rows: permute(rows, groups), x)  # (lean saves: kernels/rebuild.py)
    gate_up = expert_linear(xs, gate_up_proj, lora.get("gate_up_proj"), offsets, counts, method, stacked=False,
                            bias=gate_up_bias)
    h = clamped_swiglu(gate_up, limit, alpha)
    out = expert_linear(h, down_proj, lora.get("down_proj"), offsets, counts, method, stacked=False, bias=down_bias)
    return unpermute(out, groups.pos, weights)


def gpt_oss_experts_reference(x, weights, experts, gate_up_proj, gate_up_bias, down_proj, down_bias, limit: float,
                              alpha: float) -> torch.Tensor:
    """The loop over experts of transformers' eager GptOssExperts.forward, for the tests; arguments and result as
    gpt_oss_experts_forward (without LoRA)."""
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = clamped_swiglu_reference(x[token] @ gate_up_proj[e] + gate_up_bias[e], limit, alpha)
        y = (h @ down_proj[e] + down_bias[e]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(x.dtype))
    return out


class GptOssRouter(nn.Module):
    """The router: `weight` (E, H) and `bias` (E,); forward x (N, H) -> logits (N, E) in x's dtype. Not an
    nn.Linear, as transformers' GptOssTopKRouter is not: "all-linear" LoRA and quantisation leave it alone."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> router logits (N, E) in x's dtype."""
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class GptOssExperts(nn.Module):
    """E clamped-SwiGLU MLPs with biases, stacked in transformers' (in, out) layout (see the module docstring).
    `lora` holds ExpertLora adapters of gate_up_proj / down_proj by name (peft/lora.py; `transposed` ones)."""

    # PEFT's ParamWrapper reads the stacked weights as (E, in, out) on modules that say so (transformers sets
    # this attribute on GptOssExperts); peft/lora.py's ExpertLora does the same.
    is_transposed = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, limit: float, alpha: float):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.limit, self.alpha = limit, alpha
        self.lora = nn.ModuleDict()

    def forward(self, x, weights, experts):
        """x (N, H); weights (N, k) and experts (N, k) from route_top_logits -> (N, H) in x's dtype (with the
        enabled LoRA adapters of `lora`)."""
        lora = {name: adapter.factors(x.dtype) for name, adapter in self.lora.items() if not adapter.disabled}
        return gpt_oss_experts_forward(x, weights, experts, self.gate_up_proj, self.gate_up_proj_bias,
                                       self.down_proj, self.down_proj_bias, self.limit, self.alpha, lora=lora)


class GptOssMoeBlock(nn.Module):
    """gpt-oss's MLP (transformers' GptOssMLP): `router` picks `top_k` of the `experts` per token.

    forward: x (B, T, H) -> (out (B, T, H) in x's dtype, router logits (B*T, E), bias included, which the
    load-balancing loss reads as transformers records them)."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = GptOssRouter(cfg.hidden_size, cfg.num_experts)
        self.experts = GptOssExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit,
                                     cfg.swiglu_alpha)

    def forward(self, x: torch.Tensor, values_unused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> (out, router logits); `values_unused` is accepted for the dense MLP's signature and has
        no effect."""
        shape = x.shape
        flat = mark_through(x.reshape(-1, shape[-1]), lambda t: t.reshape(-1, shape[-1]), x)  # (lean saves)
        logits = self.router(flat)
        weights, experts = route_top_logits(logits, self.top_k)
        return self.experts(flat, weights, experts).view(shape), logits
