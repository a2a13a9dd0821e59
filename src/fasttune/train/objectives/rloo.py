"""RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024) as TRL 1.16's RLOOTrainer computes it, on GRPO's sampling
and scoring (grpo.py): each completion's advantage is its reward minus the mean reward of the other completions of
its prompt, after optional clipping (reward_clip_range) and a KL penalty beta x sum over its tokens of (sampling
policy - reference) log-probs taken off the reward; optionally normalised over the batch. The loss is PPO's clipped
objective on the sequence's log-probability ratio, a mean over the micro-batch's completions, divided by the
micro-batches of the step (the transformers Trainer divides by gradient accumulation).
"""
from __future__ import annotations

import torch

from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import RLOOConfig
from fasttune.train.objectives.grpo_loss import clip_stats, nanstd

__all__ = ["RLOOTrainer", "RLOOConfig"]


def leave_one_out_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, group: int,
                             kl: torch.Tensor | None, beta: float, clip_range: tuple | None,
                             normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16 RLOOTrainer's advantages.

    Args:
        rewards_per_func: (N, F) float32, N = groups x `group` completions (groups consecutive), NaN where a
            function returned None. weights: (F,). kl: (N,) summed per-token (sampling - reference) log-probs, or
            None (beta 0). clip_range: (low, high) or None. normalize: scale the advantages to mean 0 / std 1.
    Returns: (advantages (N,), the weighted rewards before clipping and penalty (N,), the std of each completion's
        group after them (N,)). A completion no function scored, or alone among its scored siblings, gets 0.
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None]).nansum(dim=1)
    rewards[unscorable] = float("nan")
    raw = rewards.clone()
    if clip_range is not None:
        rewards = rewards.clamp(min=clip_range[0], max=clip_range[1])
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, group)
    std = nanstd(grouped, dim=1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    if group > 1:
        counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
        advantages = (grouped - baselines).reshape(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), raw, std


class RLOOTrainer(GRPOTrainer):
    """RLOO on rows with a `prompt`, as TRL 1.16's RLOOTrainer: GRPOTrainer's arguments, data, sampling, reward
    functions (and reward models), images and evaluation, with RLOOConfig. With beta > 0 (the default, 0.05) the
    reference is the policy as handed to the trainer (see GRPOTrainer). Raises ConfigError as
    GRPOTrainer does."""

    config_cls = RLOOConfig
    takes_tools = False  # (TRL's trainer of this name samples in one turn)
    packing_refusal = "packing does not apply to RLOO; set packing=False."

    @property
    def keeps_old_logps(self) -> bool:
        """The KL penalty (beta > 0) reads the sampling policy's log-probs, as reused batches do."""
        return self.reuses_samples or self.args.beta != 0.0

    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """Rewards -> micro-batches (with the sampling policy's and the reference's log-probs when beta > 0) ->
        leave-one-out advantages with the KL penalty (across_ranks: over every rank's completions, gathered),
        written into the micro-batches."""
        a = self.args
        rewards_per_func = self.compute_rewards(examples, completion_ids)
        batches = self.micro_batches(examples, completion_ids, truncated, torch.zeros(len(examples)), sizes)
        kl = None
        if a.beta != 0.0:
            per_token = [(b["old_logps"] - b["ref_logps"]) * b["completion_mask"].to(b["old_logps"].device)
                         for b in batches]
            kl = torch.cat([t.sum(-1) for t in per_token]).float().cpu() if per_token else torch.zeros(0)
            tokens = sum(b["completion_mask"].sum() for b in batches)
            self._add_ratio("kl", sum(t.sum() for t in per_token), tokens)  # TRL's kl: the mean per token
        rollout = self.gather_rollout(rewards_per_func, completion_ids, truncated, across_ranks, kl)
        self._check_unrewarded(rollout.rewards_per_func)
        advantages, rewards, std = leave_one_out_advantages(rollout.rewards_per_func, self.reward_weights,
                                                            group or a.num_generations, rollout.extra, a.beta,
                                                            a.reward_clip_range, a.normalize_advantages)
        self._record_rollout(rollout, rewards, std)
        self.keep_completions(rollout, advantages, across_ranks)
        advantages, start = rollout.mine(advantages), 0
        for b in batches:
            n = b["input_ids"].shape[0]
            b["advantages"] = advantages[start:start + n]
            start += n
        return batches

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-min(r A, clip(r) A) per completion with r = exp(log p(completion) - its sampling log p), the mean over
        the micro-batch's completions / the step's micro-batches; records the clip-ratio metrics (per completion)
        and the completion tokens' mean entropy (TRL's `entropy`)."""
        mask = batch["completion_mask"]
        token_logps, entropies, aux = self.policy_logps(batch)
        logps = (token_logps * mask).sum(-1)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else (old * mask).sum(-1)
        adv = batch["advantages"]
        ratio = torch.exp(logps - old)
        clipped = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high)
        loss = self.with_aux_loss(-torch.min(ratio * adv, clipped * adv).mean() / int(batch["steps"]), aux)
        with torch.no_grad():
            m = mask.float()
            self._add_ratio("entropy", (entropies.detach() * m).sum(), m.sum())
            one = torch.ones_like(ratio)[:, None]
            for name, (s, n) in clip_stats(ratio[:, None], adv, one, self.eps_low, self.eps_high).items():
                self._add_ratio(name, s, n)
        return loss, loss.detach().to(torch.float64) * num_items
