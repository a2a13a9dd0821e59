"""GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization") as TRL 1.16's experimental GMPOTrainer computes it:
GRPO's sampling, rewards and advantages, with the loss of each completion -exp(mean over its tokens of the clipped
log-ratio) x its advantage, the clipping one-sided in log space (log-ratios of positive-advantage completions capped
at epsilon_high, of negative ones floored at -epsilon), plus beta x the completion's mean k3 KL to the reference;
the mean over completions, divided by the step's micro-batches. TRL's loss_type and the other surrogate settings
(importance_sampling_level, delta, vespo / sapo, off-policy masks, entropy bonus) do not enter GMPO's loss there or
here; top_entropy_quantile drops low-entropy tokens from the geometric mean. TRL's GMPO leaves out the MoE
load-balancing loss (its loss replaces the one that adds it), and so does this one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import GRPOConfig
from fasttune.train.objectives.grpo_loss import high_entropy_mask

__all__ = ["GMPOTrainer", "GMPOConfig"]


@dataclass
class GMPOConfig(GRPOConfig):
    """GRPOConfig with GMPO's clipping range: epsilon / epsilon_high are log-space bounds (the ratio's range is
    (exp(-epsilon), exp(epsilon_high))), 0.4 by default as the GMPO paper and TRL's GMPOConfig."""

    epsilon: float = 0.4


class GMPOTrainer(GRPOTrainer):
    """GRPOTrainer with GMPO's geometric-mean objective (module docstring); the same arguments as GRPOTrainer (and
    TRL's GMPOTrainer). Logs TRL's metrics: entropy, kl (beta > 0), clip_ratio/low_mean, high_mean, region_mean
    (tokens beyond the log-space bounds on the side their advantage clips)."""

    config_cls = GMPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_weight = 0.0  # no load-balancing loss in GMPO's objective (module docstring)

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, float]:
        """The mean over this micro-batch's completions of -exp(clipped mean log-ratio) x advantage (+ beta x mean
        KL), / the step's micro-batches in training."""
        a = self.args
        mask = batch["completion_mask"].float()
        logps, entropies, _ = self.policy_logps(batch)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        adv = batch["advantages"]
        log_ratio = logps - old
        clamped = log_ratio.clamp(-self.eps_low, self.eps_high)
        side = adv[:, None] > 0
        clipped = torch.where(side, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
        keep = mask
        if a.top_entropy_quantile < 1.0:
            keep = mask * high_entropy_mask(entropies.detach(), mask, 1.0 - a.top_entropy_quantile)
        weight = torch.exp((clipped * keep).sum(-1) / keep.sum(-1).clamp(min=1.0))
        per_completion = -weight * adv
        kl = None
        if a.beta != 0.0:
            delta = batch["ref_logps"] - logps
            kl = torch.exp(delta) - delta - 1
            per_completion = per_completion + a.beta * (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        steps = int(batch["steps"]) if self.model.training else 1
        loss = per_completion.mean() / steps
        with torch.no_grad():
            n = mask.sum()
            self._add_ratio("entropy", (entropies.detach() * mask).sum(), n)
            if kl is not None:
                self._add_ratio("kl", (kl.detach() * mask).sum(), n)
            low = (log_ratio < -self.eps_low) & (adv[:, None] < 0)
            high = (log_ratio > self.eps_high) & side
            for name, hit in (("low_mean", low), ("high_mean", high), ("region_mean", low | high)):
                self._add_ratio(f"clip_ratio/{name}", (hit.float() * mask).sum(), n)
        self._step_end()
        return loss, loss.detach().to(torch.float64) * num_items
