"""GRPO math, with TRL 1.16's semantics: group-normalised advantages, the clipped per-token objective with an
optional k3 KL to the reference, and the per-loss-type normalisation under gradient accumulation.

Normalisation per `loss_type` (B = completions in the micro-batch, `steps` = micro-batches in the optimizer step
summed over ranks, since fasttune sums gradients over ranks where DDP averages them):
- dapo (TRL's default): sum over the completion tokens of the whole accumulated batch / their count (`num_items`);
  the same result for any split into micro-batches.
- grpo: mean over completions of each completion's token mean, / steps.
- bnpo: token mean of the micro-batch, / steps (TRL normalises over the local micro-batch only).
- dr_grpo: token sum / (B * max_completion_length), / steps.
- cispo and vespo: as dapo; sapo: as grpo; luspo: mean over completions of each completion's token sum, / steps.

`off_policy_mask` (DeepSeek-V3.2's off-policy sequence masking, TRL's off_policy_mask_threshold) drops
negative-advantage completions whose policy has drifted from the one that sampled them. The entropy terms (TRL 1.16):
`high_entropy_mask` keeps the top `top_entropy_quantile` of the completion tokens by entropy in the policy term
(Wang et al. 2025, "Beyond the 80/20 rule"), and `entropy_bonus` is the mean entropy that `entropy_coef` weighs
against the loss (with `use_adaptive_entropy`, Skywork-OR1's controller: grpo.py).
"""
from __future__ import annotations

import torch

import math

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # TRL's multi_objective_aggregation
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected) ignoring NaNs; NaN with fewer than two values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt().squeeze(dim) if dim is not None else var.sqrt().squeeze()


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                     scale_rewards: str, aggregation: str = "sum_then_normalize"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, F) rewards of N = groups x num_generations completions (groups consecutive) -> (advantages (N,),
    weighted rewards (N,), the std each advantage was scaled by (N,)). NaN rewards (a function returned None) are
    left out of the sums; a completion no function scored gets advantage 0.

    aggregation (TRL 1.16's multi_objective_aggregation): "sum_then_normalize" weighs and sums the functions' rewards,
    then subtracts the group mean and divides by the group's (or, scale_rewards="batch", the batch's) std;
    "normalize_then_sum" (GDPO, arXiv 2601.05242) normalises each function's rewards within its group first, sums
    them weighted, then normalises that sum over the batch (scale_rewards does not apply); the rewards returned are
    the weighted raw sums either way."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None]).nansum(dim=1)
    rewards[unscorable] = float("nan")
    if aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1).unsqueeze(1) if num_generations > 1 else torch.zeros_like(mean_k)
        summed = (((grouped - mean_k) / (std_k + 1e-4)).view_as(rewards_per_func) * weights[None]).nansum(dim=1)
        summed[unscorable] = float("nan")
        std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
        return torch.nan_to_num((summed - torch.nanmean(summed)) / (std + 1e-4), nan=0.0), rewards, std
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # "group"; with "none" it is only reported (zero-std groups)
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations) if num_generations > 1 \
            else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), rewards, std


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                   epsilon_high: float, beta: float, ref_logps: torch.Tensor | None, bias_correction_kl: bool = True,
                   mask: torch.Tensor | None = None, level: str = "token", loss_type: str = "dapo",
                   delta: float | None = None, sapo_temperatures: tuple = (1.0, 1.05),
                   vespo: tuple = (2.0, 3.0, 3.0, 2.0), entropy_mask: torch.Tensor | None = None):
    """The per-token policy term + beta * KL_k3. Returns (loss, ratio, kl or None); ratio r = exp(logps - old).

    - dapo / grpo / bnpo / dr_grpo / luspo: -min(r A, clip(r, 1-eps_low, 1+eps_high) A), with delta (INTELLECT-2's
      two-sided clipping) r capped at delta in the first term;
    - cispo (ScaleRL): -min(r, eps_high), detached, x A x logps: the clipped weight of a REINFORCE term;
    - sapo (Gao et al. 2025): -sigmoid(t (r - 1)) x 4 / t x A, t = sapo_temperatures[0] where A > 0, else [1];
    - vespo: -phi(w) x A x logps, phi the detached gamma weight of the sequence ratio (vespo_weights; `vespo` =
      (k_pos, lambda_pos, k_neg, lambda_neg)).
    entropy_mask (B, T) bool or (B, 1) / (B, T) float: the policy term only where nonzero (high_entropy_mask, and / or
    off_policy_mask), before the KL is added.
    With bias_correction_kl the KL is weighted by r (DeepSeek-V3.2's unbiased reverse-KL gradient).
    level "sequence" (GSPO, Zheng et al. 2025; TRL's importance_sampling_level): r is one per completion (B, 1), the
    exponent of its mean log-ratio over the completion tokens of `mask`; the loss is then (B, 1) without a KL term.
    The formulas are TRL 1.16's GRPOTrainer._compute_loss."""
    adv = advantages[:, None]
    log_ratio = logps - old_logps
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        loss = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logps
    elif loss_type == "sapo":
        t = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1])
        loss = -torch.sigmoid(t * (ratio - 1)) * 4 / t * adv
    elif loss_type == "vespo":
        loss = -vespo_weights(logps - old_logps, mask, advantages, *vespo) * adv * logps
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        loss = -torch.min(capped * adv, clipped * adv)
    if entropy_mask is not None:
        loss = loss * entropy_mask
    kl = None
    if beta != 0.0:
        # k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    return loss, ratio, kl


def reduce_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, num_items: int, steps: int,
                max_completion_length: int) -> torch.Tensor:
    """The micro-batch's share of the optimizer step's loss (see the module docstring)."""
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if loss_type in ("dapo", "cispo", "vespo"):
        return masked.sum() / max(num_items, 1)
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / steps
    if loss_type == "luspo":  # each completion's token sum: longer completions weigh more
        return masked.sum(-1).mean() / steps
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / steps
    if loss_type == "dr_grpo":
        return masked.sum() / (token_loss.shape[0] * max_completion_length) / steps
    raise ValueError(f"unknown loss_type {loss_type!r}")


def clip_stats(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
               epsilon_high: float, loss_type: str = "dapo") -> dict:
    """Fractions of completion tokens whose ratio was clipped (TRL's clip_ratio/* metrics), as (sum, count): 0-dim
    tensors on the device (not read here). A sequence-level ratio (B, 1) counts completions, as TRL does. cispo:
    cispo_clip_ratio (weights capped at eps_high); sapo: none."""
    adv = advantages[:, None]
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    m = mask.bool() if ratio.shape[1] > 1 else torch.ones_like(low)
    n = m.sum()
    if loss_type == "sapo":  # no clipping to report (TRL logs none)
        return {}
    if loss_type == "cispo":
        return {"cispo_clip_ratio": (((ratio > epsilon_high) & (adv > 0) & m).sum(), n)}
    return {"clip_ratio/low_mean": ((low & m).sum(), n), "clip_ratio/high_mean": ((high & m).sum(), n),
            "clip_ratio/region_mean": (((low | high) & m).sum(), n)}


@torch.no_grad()
def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, k_pos: float = 2.0,
                  lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's gamma weights (B, 1), detached: phi(w) = exp(lambda) w^k exp(-lambda w) (phi(1) = 1) of the sequence
    ratio w = exp(sum of the completion's token log-ratios (B, T), each clamped to [-20, 20]; log w clamped to
    [log 1e-8, 20]), with (k, lambda) = (k_pos, lambda_pos) where the advantage (B,) is >= 0, else the _neg pair;
    NaN / inf weights become 0. TRL 1.16's GRPOTrainer.get_gamma_weights without vLLM's sampling ratios."""
    floor = math.log(1e-8)
    seq = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    log_w = seq.clamp(floor, 20.0)
    nonneg = advantages[:, None] >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float, gather=None) -> torch.Tensor:
    """(B, T) bool: completion tokens (mask) whose entropy (B, T) is >= the `quantile` quantile (torch.quantile's
    linear interpolation) of the entropies of every completion token, over all ranks when `gather` (a function
    taking this rank's (n,) fp32 values to all ranks' values concatenated) is given. No tokens: all False. TRL
    1.16's get_high_entropy_mask, called with quantile = 1 - top_entropy_quantile."""
    m = mask.bool()
    values = entropies[m].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, quantile)
    return ((entropies * mask) >= threshold) & m


def off_policy_mask(advantages: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """(B, 1) float, 1 = keep: DeepSeek-V3.2's off-policy sequence mask (eq. 9; TRL 1.16's get_off_policy_mask). A
    completion is dropped from the policy term when its advantage (B,) is negative and its mean KL(sampling ||
    policy) over the completion tokens, mean(sampling_logps - logps) over `mask` (B, T), exceeds `threshold`
    (the paper's delta, e.g. 0.5). logps are detached here; sampling_logps are the log-probs the completions were
    sampled with (fasttune: the policy's before this generation's first update)."""
    m = mask.to(logps.dtype)
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_kl = (kl * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages[:, None] >= 0) | (mean_kl <= threshold)).to(m.dtype)


def entropy_bonus(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) over the tokens of `mask` (B, T) (0 without tokens): the term entropy_coef multiplies,
    taken off the loss (TRL 1.16: L = L_policy - coef x H)."""
    m = mask.to(entropies.dtype)
    return (entropies * m).sum() / m.sum().clamp(min=1.0)
