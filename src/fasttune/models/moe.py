"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): a linear router, top-k routing with the family's
normalisation, and experts stored stacked as transformers 5 keeps them in memory (`experts.gate_up_proj`
(E, 2I, H), `experts.down_proj` (E, H, I), router `gate.weight` (E, H)), so adapters and merged checkpoints use
transformers' names.

The experts run as two grouped GEMMs over the tokens sorted by expert (torch's grouped_mm, on CUDA and on
CPU), or, where that kernel cannot run (unaligned shapes, fp32 on CUDA), as one padded batched GEMM; never as
a Python loop over experts. `experts_reference` is the loop, as transformers' eager experts compute it, for
the tests. LoRA on the stacked weights (peft/lora.py's ExpertLora) adds two rank-r products per weight on the
same sorted tokens: x @ (W_e + s B_e A_e)^T = x @ W_e^T + s (x @ A_e^T) @ B_e^T, exactly; with our kernels on they
are added into the base output and its input gradient in place (`expert_linear`, kernels/grouped_lora.py).
With `load_in_4bit` the stacked weights are NF4 (quant/experts.py's QuantExpertWeight), dequantised per use.
"""
from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttune.kernels.activations import gated_act_packed, gated_act_reference
from fasttune.kernels.dispatch import launches_replayed, use_triton
from fasttune.kernels.rebuild import call_rebuilding, mark_through
from fasttune.kernels.grouped_lora import expert_lora_linear
from fasttune.kernels.moe_permute import group_by_expert, permute, unpermute
from fasttune.quant.experts import QuantExpertWeight

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: softmax over all experts (fp32), the k largest, renormalised to sum 1 when norm_topk_prob.

    router_logits (N, E) any float dtype -> (weights (N, k) fp32, experts (N, k) int64). Mixtral always
    renormalises (the same as a softmax over the top-k logits); Qwen3-MoE does when `norm_topk_prob` (source:
    transformers' MixtralTopKRouter / Qwen3MoeTopKRouter)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def route_sigmoid(router_logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, groups: tuple,
                  norm_topk_prob: bool, scaling: float, eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing (transformers' DeepseekV3TopkRouter / Glm4MoeTopkRouter; LFM2-MoE's Lfm2MoeTopKRouter
    without groups, eps 1e-6): sigmoid scores in fp32; each of n_group expert groups scored by the sum of its two best
    (score + bias); experts chosen by score + bias among the topk_group best groups; their weights are the plain
    scores, renormalised (+ eps) when norm_topk_prob, times `scaling` (routed_scaling_factor).

    router_logits (N, E); bias (E,) fp32 e_score_correction_bias / expert_bias, or None; groups (n_group,
    topk_group) -> (weights (N, k) fp32, experts (N, k) int64)."""
    scores = router_logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    return _pick_in_best_pairs(scores, choice, top_k, groups, norm_topk_prob, scaling, eps)


def route_softmax_pairs(router_logits: torch.Tensor, top_k: int, groups: tuple, norm_topk_prob: bool,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mistral 4's routing (transformers' Mistral4TopkRouter): DeepSeek-V3's groups (ranked by the sum of their two
    best scores) and weights (renormalised + 1e-20 when norm_topk_prob, times `scaling`) over softmax scores, computed
    in the logits' dtype as transformers does. router_logits (N, E) -> (weights (N, k) fp32, experts (N, k) int64)."""
    scores = torch.softmax(router_logits, dim=-1)
    weights, experts = _pick_in_best_pairs(scores, scores, top_k, groups, norm_topk_prob, scaling)
    return weights.float(), experts


def route_softmax_bias(router_logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                       norm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE 4.5 MoE's routing (transformers' Ernie4_5_MoeTopKRouter): softmax in fp32, the top_k experts by
    probability + bias (e_score_correction_bias), weighted by their probabilities over max(their sum, norm_min).

    router_logits (N, E); bias (E,) or (1, E) fp32 -> (weights (N, k) fp32, experts (N, k) int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    experts = torch.topk(probs + bias.float().reshape(-1), top_k, dim=-1)[1]
    weights = probs.gather(1, experts)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min), experts


def _pick_in_best_pairs(scores, choice, top_k: int, groups: tuple, norm_topk_prob: bool, scaling: float,
                        eps: float = 1e-20):
    """The top_k experts by `choice` (N, E) among the topk_group of n_group groups with the highest sum of their two
    best choices; weights: their `scores`, renormalised (+ eps) when norm_topk_prob, times `scaling`."""
    n_group, topk_group = groups
    if n_group > 1:
        grouped = choice.view(-1, n_group, choice.shape[-1] // n_group)
        best = torch.topk(grouped.topk(2, dim=-1)[0].sum(dim=-1), k=topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        choice = choice.masked_fill(~keep[..., None].expand_as(grouped).reshape(choice.shape), float("-inf"))
    experts = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights * scaling, experts


def route_softmax_grouped(router_logits: torch.Tensor, top_k: int, groups: tuple, scaling: float):
    """DeepSeek-V2's routing (transformers' DeepseekV2TopkRouter): softmax over all experts in fp32; with groups =
    (n_group, topk_group) beyond (1, 1), only the topk_group groups with the highest single score keep theirs; the
    k largest, not renormalised, times `scaling`. router_logits (N, E) -> (weights (N, k) fp32, experts (N, k))."""
    scores = torch.softmax(router_logits.float(), dim=-1)
    n_group, topk_group = groups
    if n_group > 1:
        n, e = scores.shape
        best = scores.view(n, n_group, e // n_group).amax(dim=-1)
        keep = torch.zeros_like(best).scatter_(1, torch.topk(best, topk_group, dim=-1).indices, 1.0)
        scores = scores.masked_fill(~keep.bool().repeat_interleave(e // n_group, dim=1), 0.0)
    weights, experts = torch.topk(scores, top_k, dim=-1)
    return weights * scaling, experts


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # (a property query per call costs more than the check)


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes x (S, K) @ w (E, K, M) here: it exists, bf16 on CUDA (fp32 is
    refused there), and rows of both operands are whole multiples of 16 bytes (the kernel's stride rule)."""
    if _GROUPED_MM is None or x.dtype != w.dtype:
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or _capability(x.get_device()) < (8, 0)):
        return False
    size = x.element_size()
    return (w.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0


def _grouped_kernel(x: torch.Tensor, w: torch.Tensor, method: str) -> bool:
    return method == "grouped_mm" or (method == "auto" and grouped_mm_usable(x, w))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor,
               method: str = "auto") -> torch.Tensor:
    """Rows of x grouped by expert times that expert's matrix: out[s] = x[s] @ w[e(s)].

    x (S, K) sorted by expert; w (E, K, M) (a transposed view is fine); offsets (E,) int32 cumulative row ends
    of the groups; counts (E,) their sizes. method: "grouped_mm" (torch's grouped GEMM kernel), "padded_bmm"
    (groups padded to the largest one, one bmm; reads counts on the host) or "auto" (the kernel where
    grouped_mm_usable). Returns (S, M) in x's dtype; differentiable in x and w."""
    if _grouped_kernel(x, w, method):
        return _GROUPED_MM(x, w, offs=offsets)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # cuda_graphs: this fails the capture, clearly
        raise RuntimeError("the padded-bmm expert path sizes its groups on the host, which a CUDA graph cannot "
                           "hold; graphs need torch's grouped GEMM kernel (bf16 experts, compute capability >= 8.0)")
    experts = torch.repeat_interleave(torch.arange(w.shape[0], device=x.device), counts.long(),
                                      output_size=x.shape[0])
    starts = (offsets - counts).long()
    slot = torch.arange(x.shape[0], device=x.device) - starts[experts]
    capacity = max(int(counts.max()), 1) if x.shape[0] else 1
    padded = x.new_zeros(w.shape[0], capacity, x.shape[1]).index_put((experts, slot), x)
    return torch.bmm(padded, w)[experts, slot]


class _DequantGroupedMM(torch.autograd.Function):
    """out[s] = x[s] @ W[e(s)]^T for rows sorted by expert (or x[s] @ W[e(s)] for an (E, in, out) stack, `kn`),
    an NF4 stack W dequantised in forward and again in backward (nothing weight-sized is saved)."""

    @staticmethod
    def forward(ctx, x, holder, offsets, counts, method, kn=False):
        """x (S, in) sorted by expert, holder a QuantExpertWeight (E, out, in), or (E, in, out) with kn. Returns
        (S, out) in x's dtype."""
        ctx.holder, ctx.method, ctx.kn = holder, method, kn
        ctx.save_for_backward(offsets, counts)
        w = holder.dequantized(x.dtype)
        return grouped_mm(x, w if kn else w.transpose(1, 2), offsets, counts, method)

    @staticmethod
    def backward(ctx, grad):
        """grad (S, out) -> (dx (S, in), None x 5): the NF4 stack is frozen."""
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        offsets, counts = ctx.saved_tensors
        w = ctx.holder.dequantized(grad.dtype)  # d x[s] = grad[s] @ W[e(s)]: the (E, out, in) stack as it is
        dx = grouped_mm(grad, w.transpose(1, 2) if ctx.kn else w, offsets, counts, ctx.method)
        return dx, None, None, None, None, None


def _with_lora(out: torch.Tensor, x: torch.Tensor, lora, offsets, counts, method: str) -> torch.Tensor:
    """out + s * (x @ A_e^T) @ B_e^T per group; lora = (a (E, K, r), b (E, r, M), s) or None (out unchanged). The
    plain path (torch's grouped GEMMs); expert_linear takes the fused one where it can."""
    if lora is None:
        return out
    a, b, scaling = lora
    # (the rank-r product keeps x for a's gradient: with lean saves a marked x is rebuilt instead, kernels/rebuild.py)
    xa = call_rebuilding(lambda rows, factor: grouped_mm(rows, factor, offsets, counts, method), x, a)
    low = grouped_mm(xa, b, offsets, counts, method)
    return torch.add(out, low, alpha=scaling)


def _frozen(t) -> bool:
    return t is None or isinstance(t, QuantExpertWeight) or not t.requires_grad


# Work of one expert projection (rows x in x out multiply-adds) from which the fused expert LoRA pays in an eager
# step. Its Triton launches cost the host more than torch's grouped GEMMs do, and an eager MoE step with small experts
# is bound by the host. Measured on an H200 (eager, no recompute, bs 2 x 2048, expert LoRA r16, one run each):
# Qwen3-30B-A3B (projections of 1.0e11 and 5.2e10): 12,809 tokens/s on torch's grouped GEMMs, 9,867-10,314 fused;
# gpt-oss-20b (2.7e11 and 1.4e11): 13,721 against 14,225 fused. Under CUDA graphs the launches are replayed and
# the fused path is taken at any size (Qwen3: 19,326 tokens/s).
EAGER_FUSED_MIN_WORK = 1.2e11


def _fused_pays(x: torch.Tensor, lora) -> bool:
    """Whether the fused expert LoRA is worth its launches for rows x (S, K) and factors lora (a, b (E, r, N), s)."""
    return launches_replayed() or x.shape[0] * x.shape[1] * lora[1].shape[-1] >= EAGER_FUSED_MIN_WORK


def expert_linear(x: torch.Tensor, weight, lora, offsets: torch.Tensor, counts: torch.Tensor, method: str,
                  stacked: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One expert projection on rows sorted by expert, with its LoRA and bias: x[s] @ W_e (+ LoRA) (+ bias_e).

    x (S, K); weight: an (E, N, K) stack (`stacked`, models/moe.py's layout: out[s] = x[s] @ W_e^T) or an (E, K, N)
    one (gpt-oss's), a tensor or a QuantExpertWeight (NF4, dequantised per use); lora: (a (E, K, r), b (E, r, N),
    scaling) or None; bias (E, N) or None; offsets/counts/method as grouped_mm. With our kernels on, the base
    and bias frozen, and the work large enough or the step captured in a CUDA graph (_fused_pays), one fused
    Function (kernels/grouped_lora.py's expert_lora_linear: the rank-r products added in place, the weight gradients
    in Triton); otherwise torch's grouped GEMMs. Returns (S, N) in x's dtype."""
    def dense(dtype):
        """The (E, K, N) operand in `dtype`: a view of the stack, or a fresh dequantisation of an NF4 one."""
        w = weight.dequantized(dtype) if isinstance(weight, QuantExpertWeight) else weight.to(dtype)
        return w.transpose(1, 2) if stacked else w

    if lora is not None and use_triton(x) and _frozen(weight) and _frozen(bias) and _fused_pays(x, lora):
        a, b, scaling = lora
        mm = functools.partial(grouped_mm, method=method)
        return expert_lora_linear(x, dense, mm, a, b, scaling, offsets, counts,
                                  None if bias is None else bias.to(x.dtype))
    if isinstance(weight, QuantExpertWeight):  # dequantised again in backward: no 16-bit stack is saved
        out = _DequantGroupedMM.apply(x, weight, offsets, counts, method, not stacked)
    else:
        out = grouped_mm(x, dense(x.dtype), offsets, counts, method)
    out = _with_lora(out, x, lora, offsets, counts, method)
    if bias is not None:  # the groups are contiguous: bias_e per row by the row's expert
        out = out + bias.to(x.dtype).repeat_interleave(counts.long(), dim=0, output_size=x.shape[0])
    return out


def experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, act: str, method: str = "auto", lora: dict | None = None,
                    gated: bool = True) -> torch.Tensor:
    """sum_j weights[n, j] * down_e(act(gate_e(x_n)) * up_e(x_n)) for e = experts[n, j], without a loop over experts.

    x (N, H); weights (N, k) float; experts (N, k) int64; gate_up_proj (E, 2I, H) with gate rows first;
    down_proj (E, H, I); act: a gated activation name (kernels/activations.py). Returns (N, H) in x's dtype.
    The N*k (token, expert) pairs are sorted by expert and run as two grouped GEMMs (see `grouped_mm`); the
    rows move between token and expert order by kernels/moe_permute.py (gathers, also in backward), which also
    weights and sums each token's k results.
    lora: optional low-rank updates of the stacked weights, {"gate_up_proj" | "down_proj": (a, b, scaling)} with
    a (E, in, r) and b (E, r, out) in x's dtype (ExpertLora.factors): expert e's weight acts as W_e + scaling *
    (a_e @ b_e)^T, computed as two more grouped GEMMs on the sorted rows (no merged weight is formed).
    gated=False: Nemotron-H's ungated experts, down_e(relu(up_e(x_n))^2), gate_up_proj then being up_proj (E, I, H)
    (its LoRA under "up_proj")."""
    lora = lora or {}
    groups = group_by_expert(experts, gate_up_proj.shape[0])
    offsets, counts = groups.offsets, groups.counts
    xs = mark_through(permute(x, groups), lambda rows: permute(rows, groups), x)  # (lean saves: see kernels/rebuild.py)
    first = "gate_up_proj" if gated else "up_proj"
    gate_up = expert_linear(xs, gate_up_proj, lora.get(first), offsets, counts, method, stacked=True)
    h = gated_act_packed(gate_up, act) if gated else torch.relu(gate_up).square()
    out = expert_linear(h, down_proj, lora.get("down_proj"), offsets, counts, method, stacked=True)
    return unpermute(out, groups.pos, weights)


def experts_reference(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor,
                      down_proj: torch.Tensor, act: str, gated: bool = True) -> torch.Tensor:
    """The plain loop over experts of transformers' eager MixtralExperts / Qwen3MoeExperts.forward (NemotronHExperts'
    with gated=False): the reference `experts_forward` is tested against. Same arguments and result."""
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        if gated:
            gate, up = F.linear(x[token], gate_up_proj[e]).chunk(2, dim=-1)
            h = gated_act_reference(gate, up, act)
        else:
            h = torch.relu(F.linear(x[token], gate_up_proj[e])).square()
        y = F.linear(h, down_proj[e]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(x.dtype))
    return out


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer auxiliary loss (eqs. 4-6 of arXiv:2101.03961) as transformers' load_balancing_loss_func
    computes it: E * sum_e f_e * P_e, where f_e is the fraction of top-k assignments and P_e the mean router
    probability of expert e, both pooled over all MoE layers' tokens (padding excluded by attention_mask).

    router_logits: one (B*T, E) tensor per MoE layer; attention_mask (B, T) or None. Returns a () fp32 tensor,
    differentiable through the router probabilities (the counts are not)."""
    device = router_logits[0].device
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        if mask is None:
            tokens = tokens + torch.zeros_like(tokens).index_add(0, chosen, torch.ones_like(chosen, dtype=tokens.dtype))
            probs_sum = probs_sum + probs.sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            tokens = tokens + torch.zeros_like(tokens).index_add(0, chosen, mask.repeat_interleave(top_k))
            probs_sum = probs_sum + (probs * mask[:, None]).sum(dim=0)
            rows = rows + mask.sum()
    return torch.sum((tokens / rows) * (probs_sum / rows)) * num_experts


class Router(nn.Module):
    """The router linear, `weight` (E, H) without bias; forward: x (N, H) -> logits (N, E) in x's dtype.
    It has nn.Linear's in_features / out_features / bias (None) so a LoraLinear can wrap it (LoRA on the router),
    but is not an nn.Linear: quantisation and "linear layer" selections leave it alone, as transformers 5's
    router module is left alone by bitsandbytes and PEFT.

    With `score_bias` (GLM-4.5's sigmoid routing) it also holds `e_score_correction_bias` (E,), and its weight and
    bias stay fp32 whatever the model's dtype (`keep_fp32`, read by the loader) and the logits are computed in fp32,
    as transformers keeps and computes them (_keep_in_fp32_modules_strict)."""

    bias = None

    def __init__(self, hidden_size: int, num_experts: int, score_bias: bool = False, fp32: bool = False,
                 statics: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.keep_fp32 = score_bias or fp32 or statics  # (DeepSeek-V2's router is fp32 without a bias)
        if score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        if statics:  # ERNIE 4.5 MoE: the bias as transformers holds it, moe_statics.e_score_correction_bias (1, E)
            self.moe_statics = MoeStatics(num_experts)

    @property
    def in_features(self) -> int:
        """H, the hidden size."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """E, the number of experts."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> router logits (N, E) in x's dtype (the weight is cast to it), or in fp32 with keep_fp32."""
        if self.keep_fp32:
            return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight.to(x.dtype))


class MoeStatics(nn.Module):
    """ERNIE 4.5 MoE's routing bias under transformers' name (Ernie4_5_MoeStatics): e_score_correction_bias (1, E),
    a frozen fp32 parameter (keep_fp32, read by the loader)."""

    keep_fp32 = True

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts), requires_grad=False)


class Experts(nn.Module):
    """E gated MLPs stored stacked: gate_up_proj (E, 2I, H) (gate rows, then up rows), down_proj (E, H, I); or, with
    gated=False, Nemotron-H's ungated ReLU² experts (transformers' NemotronHExperts): up_proj (E, I, H), down_proj.
    `lora` holds LoRA adapters of the stacked weights by parameter name (peft/lora.py's ExpertLora; empty
    without LoRA): anything with `disabled` and `factors(dtype) -> (a, b, scaling)` as experts_forward takes."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.first_name = "gate_up_proj" if gated else "up_proj"
        setattr(self, self.first_name, nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * intermediate_size,
                                                                hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = act
        self.lora = nn.ModuleDict()

    def forward(self, x, weights, experts):
        """x (N, H); weights (N, k) float and experts (N, k) int64 from `route` -> (N, H) in x's dtype; see
        experts_forward (with the enabled LoRA adapters of `lora`)."""
        lora = {name: adapter.factors(x.dtype) for name, adapter in self.lora.items() if not adapter.disabled}
        return experts_forward(x, weights, experts, getattr(self, self.first_name), self.down_proj, self.act,
                               lora=lora, gated=self.gated)


class SparseMoeBlock(nn.Module):
    """The MoE MLP of a decoder layer: `gate` (Router; Granite 4.0's `router`) picks `top_k` of the `experts` per token;
    Qwen3.5-MoE adds
    `shared_expert` (a dense MLP module given by the decoder) times sigmoid(`shared_expert_gate`(x)).

    forward: x (B, T, H) -> (out (B, T, H) in x's dtype, router logits (B*T, E) for the auxiliary loss).
    Mixtral's router jitter (training only) scales the block's input by U(1 - j, 1 + j) as transformers does."""

    def __init__(self, cfg, shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k, self.norm_topk_prob, self.jitter = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router_jitter
        self.sigmoid = cfg.router_scoring == "sigmoid"
        self.grouped_softmax = cfg.router_scoring == "softmax_grouped"
        self.softmax_pairs = cfg.router_scoring == "softmax_pairs"
        self.softmax_bias = cfg.router_scoring == "softmax_bias"
        self.groups, self.scaling = cfg.router_groups, cfg.routed_scaling
        self.renorm_eps = cfg.router_renorm_eps
        # LFM2-MoE: the routing bias is the block's own (fp32), its router in the model's dtype
        self.bias_on_block = self.sigmoid and cfg.score_bias == "block"
        self.router_name = cfg.module_name("gate")  # (Granite 4.0: router)
        setattr(self, self.router_name, Router(cfg.hidden_size, cfg.num_experts, fp32=self.grouped_softmax,
                                               score_bias=self.sigmoid and cfg.score_bias == "router",
                                               statics=self.softmax_bias))
        self.fp32_tensors = ("expert_bias",) if self.bias_on_block else ()  # (read by the loader)
        if self.bias_on_block:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        latent = cfg.moe_latent_size
        if latent is not None:  # Nemotron 3 Super: the experts run on a latent projection (transformers' NemotronHMoE)
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, bias=cfg.mlp_bias)
            self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, bias=cfg.mlp_bias)
        self.experts = Experts(cfg.num_experts, latent or cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act,
                               cfg.experts_gated)
        # a dense MLP every token takes (GLM-4.5's shared_experts), scaled by a learned gate in Qwen3.5-MoE
        self.shared_name = cfg.module_name("shared_expert") if shared_expert is not None else None
        if shared_expert is not None:
            setattr(self, self.shared_name, shared_expert)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, values_unused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> (out (B, T, H) in x's dtype, router logits (B*T, E)). `values_unused` is accepted for the
        dense MLP's signature (decoder layers pass it in recompute) and has no effect here."""
        shape = x.shape
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = mark_through(x.reshape(-1, shape[-1]), lambda t: t.reshape(-1, shape[-1]), x)  # (lean saves)
        gate = getattr(self, self.router_name)
        logits = gate(flat)
        if self.sigmoid:
            router = getattr(gate, "base_layer", gate)  # (under LoRA: a LoraLinear around it)
            bias = self.expert_bias if self.bias_on_block else getattr(router, "e_score_correction_bias", None)
            weights, experts = route_sigmoid(logits, bias, self.top_k, self.groups, self.norm_topk_prob,
                                             self.scaling, self.renorm_eps)
        elif self.grouped_softmax:
            weights, experts = route_softmax_grouped(logits, self.top_k, self.groups, self.scaling)
        elif self.softmax_pairs:
            weights, experts = route_softmax_pairs(logits, self.top_k, self.groups, self.norm_topk_prob, self.scaling)
        elif self.softmax_bias:
            statics = getattr(gate, "base_layer", gate).moe_statics  # (under LoRA: a LoraLinear around it)
            weights, experts = route_softmax_bias(logits, statics.e_score_correction_bias, self.top_k, self.renorm_eps)
        else:
            weights, experts = route(logits, self.top_k, self.norm_topk_prob)
        if hasattr(self, "fc1_latent_proj"):  # routed on the hidden state, the experts on its latent projection
            out = self.fc2_latent_proj(self.experts(self.fc1_latent_proj(flat), weights, experts))
        else:
            out = self.experts(flat, weights, experts)
        if self.shared_name is not None:
            shared = getattr(self, self.shared_name)(flat[None])[0]
            if hasattr(self, "shared_expert_gate"):  # transformers' Qwen3NextSparseMoeBlock
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared.to(out.dtype)
        return out.view(shape), logits


_EXPERT_TENSOR = re.compile(r"^(?:model\.)?(layers\.\d+)\.(mlp|block_sparse_moe|feed_forward|mixer)\.experts\.(\d+)\."
                            r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_ROUTER_TENSOR = re.compile(r"^(?:model\.)?(layers\.\d+)\.block_sparse_moe\.gate\.weight$")
# Mixtral's w1/w3/w2 are gate/up/down (transformers' conversion_mapping: MergeModulelist + Concatenate).
_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


class ExpertStacker:
    """Loads checkpoints that store one tensor per expert (what transformers 5 still writes: Qwen3-MoE
    `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight`
    and `block_sparse_moe.gate.weight`) into the stacked parameters, one slice at a time as tensors arrive, so no
    second copy of a layer's experts is held. Checkpoints already in the stacked layout load as they are."""

    def __init__(self, model: nn.Module, expected: dict, device, dtype: torch.dtype):
        self.model, self.expected, self.device, self.dtype = model, expected, device, dtype
        self.filled: dict[str, int] = {}
        self.just_completed: list[str] = []  # stacks whose last slice arrived, for the loader to quantise

    def rename(self, name: str) -> str:
        """Mixtral's router name -> ours (`mlp.gate.weight`); other names unchanged."""
        m = _ROUTER_TENSOR.match(name)
        return f"model.{m.group(1)}.mlp.gate.weight" if m else name

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one expert's tensor into its stacked parameter; False when `name` is not a per-expert tensor.
        Raises ModelLoadError for a tensor whose expert or shape the config does not have."""
        from fasttune.errors import ModelLoadError

        m = _EXPERT_TENSOR.match(name)
        if m is None:
            return False
        layer, block, expert, part = m.group(1), m.group(2), int(m.group(3)), _PART[m.group(4)]
        block = block if block in ("feed_forward", "mixer") else "mlp"  # (Mixtral's block_sparse_moe: our mlp)
        target = f"model.{layer}.{block}.experts.{'down_proj' if part == 2 else 'gate_up_proj'}"
        ungated = part == 1 and f"model.{layer}.{block}.experts.up_proj" in self.expected
        if ungated:  # (Nemotron 3's experts: up_proj alone, whole rows)
            target, part = f"model.{layer}.{block}.experts.up_proj", 2
        if target not in self.expected:
            raise ModelLoadError(f"checkpoint tensor '{name}' has no place in this config ({layer} is not a sparse "
                                 f"MoE layer). The checkpoint and config.json do not match.")
        param = self.model.get_parameter(target)
        if param.is_meta:
            param = nn.Parameter(torch.empty(param.shape, device=self.device, dtype=self.dtype), requires_grad=False)
            module_name, _, attr = target.rpartition(".")
            self.model.get_submodule(module_name)._parameters[attr] = param
        rows = param.shape[1] // 2 if part < 2 else param.shape[1]
        if expert >= param.shape[0] or tuple(tensor.shape) != (rows, param.shape[2]):
            raise ModelLoadError(f"checkpoint tensor '{name}' {tuple(tensor.shape)} does not fit '{target}' "
                                 f"{tuple(param.shape)}. The checkpoint and config.json do not match.")
        start = rows if part == 1 else 0
        with torch.no_grad():
            param[expert, start:start + rows].copy_(tensor)
        self.filled[target] = self.filled.get(target, 0) + 1
        if self.filled[target] == param.shape[0] * (2 if part < 2 else 1):
            self.just_completed.append(target)
        return True

    def complete(self) -> set[str]:
        """Names of the stacked parameters every expert slice of which arrived."""
        done = set()
        for target, n in self.filled.items():
            shape = self.expected[target].shape
            if n == shape[0] * (2 if target.endswith("gate_up_proj") else 1):
                done.add(target)
        return done
