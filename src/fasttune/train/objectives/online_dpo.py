"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback") as TRL 1.16's experimental
OnlineDPOTrainer computes it, on GRPO's sampling and reward scoring (grpo.py): each prompt gets two sampled
completions, the reward functions (or reward models) score both, the higher-scored one (the first on a tie) is
chosen, and the loss is DPO's over the pair against the reference (the policy as handed over, LoRA off):
sigmoid -log sigmoid(beta x logits) or IPO's (logits - 1 / (2 beta))^2, logits = (chosen - rejected summed log-probs)
minus the same for the reference, a mean over the micro-batch's pairs.

TRL's choices kept so that the numbers equal its trainer's: per_device_train_batch_size counts prompts (a micro-batch
holds twice as many completions); log-probs at temperature 1 (the sampling temperature is not divided out), with
left-padded rows given plain positions 0..T-1 (TRL's forward passes no position ids); prompts cut from the left so
that prompt + completion fit max_length (not with images); a completion without a stop token loses
missing_eos_penalty from its reward; rewards of several functions are the weighted sum of those not None; and the
micro-batch losses are summed over gradient accumulation, not averaged (TRL's training_step calls backward on each
micro-batch's mean, and transformers' accelerator does not divide it); the logged loss is their mean. beta may be a
list: the epoch's entry (the last one after), TRL's documented rule (TRL itself indexes the list with a fractional
epoch, so only a one-entry list works there).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fasttune.errors import ConfigError
from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import OnlineRLConfig

__all__ = ["OnlineDPOTrainer", "OnlineDPOConfig"]

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOConfig(OnlineRLConfig):
    """OnlineRLConfig with TRL 1.16 OnlineDPOConfig's fields and defaults: two completions per prompt (the pair;
    num_generations must stay 2), max_new_tokens (TRL's name for max_completion_length, 64), max_length (prompt +
    completion, 512; the prompt is cut from the left), temperature 0.9, learning_rate 5e-7, beta 0.1 (or a list,
    one per epoch), loss_type "sigmoid" | "ipo", missing_eos_penalty (taken off the reward of a completion without a
    stop token), disable_dropout True. per_device_train_batch_size counts prompts, as in TRL. Raises ConfigError for
    another num_generations, a loss_type outside LOSS_TYPES, beta <= 0, a negative missing_eos_penalty, max_length
    < 1, or GRPO's settings that online DPO does not have (num_iterations, steps_per_generation,
    generation_batch_size)."""

    num_generations: int = 2
    max_completion_length: int = 64
    max_new_tokens: int | None = None  # TRL's name; given, it sets max_completion_length
    max_length: int = 512
    temperature: float = 0.9
    learning_rate: float = 5e-7
    beta: float | list = field(default_factory=lambda: [0.1])
    loss_type: str = "sigmoid"
    missing_eos_penalty: float | None = None
    disable_dropout: bool = True

    def __post_init__(self):
        if self.max_new_tokens is not None:
            self.max_completion_length = self.max_new_tokens
        self.max_new_tokens = self.max_completion_length
        betas = self.beta
        if isinstance(betas, str):  # the CLI's form: "0.1" or "0.1,0.05"
            betas = [part for part in betas.split(",") if part.strip()]
        betas = list(betas) if isinstance(betas, (list, tuple)) else [betas]
        try:
            betas = [float(b) for b in betas]
        except (TypeError, ValueError):
            raise ConfigError(f"beta={self.beta!r} is invalid: give a number, or one per epoch (e.g. 0.1,0.05).") \
                from None
        if not betas or min(betas) <= 0:
            raise ConfigError(f"beta={self.beta!r} is invalid: DPO's beta must be > 0 (TRL's default is 0.1).")
        self.betas = betas  # (an attribute, recomputed from beta by every __post_init__)
        self.beta = betas[0]  # (what OnlineRLConfig checks)
        super().__post_init__()
        self.beta = betas[0] if len(betas) == 1 else betas  # (TRL's: a one-entry list becomes its number)
        if self.num_generations != 2:
            raise ConfigError(f"num_generations={self.num_generations} is invalid for online DPO: each prompt gets a "
                              f"pair of completions, so it stays 2.")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type='{self.loss_type}' is not supported by online DPO; use one of {LOSS_TYPES} "
                              f"(as TRL's OnlineDPOConfig).")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty={self.missing_eos_penalty} is invalid: it is taken off the "
                              f"reward, so give a value >= 0 (or None).")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"max_length={self.max_length!r} is invalid: a whole number of tokens >= 1.")
        for name, default in (("num_iterations", 1), ("steps_per_generation", None), ("generation_batch_size", None)):
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r} does not apply to online DPO (TRL's samples one "
                                  f"pair per prompt for each micro-batch and trains on it once); leave it out.")


class OnlineDPOTrainer(GRPOTrainer):
    """Online DPO on rows with a `prompt` (module docstring), as TRL 1.16's trl.experimental.online_dpo
    OnlineDPOTrainer: GRPOTrainer's arguments, data, sampling, reward functions and reward models (reward_funcs,
    reward_processing_classes) and images, with OnlineDPOConfig. The reference is the policy as handed over (its
    LoRA switched off, as TRL does for a PEFT model; with full fine-tuning a copy of every weight); ref_model= (a
    separate reference model) and an eval_dataset (TRL's trainer has no evaluation for it) are refused. Logs TRL's
    metrics:
    objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward, objective/scores,
    objective/scores_margin, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected, val/contain_eos_token, beta (objective/kl, entropy, non_score_reward and rlhf_reward over the
    completions' tokens; TRL's also sum the padding after a completion's stop token)."""

    config_cls = OnlineDPOConfig
    takes_tools = False  # (TRL's trainer of this name samples in one turn)
    scores_as_sampled = False  # TRL's online DPO: temperature 1, plain positions (module docstring)
    packing_refusal = "packing does not apply to online DPO (completions are sampled per step); set packing=False."

    @property
    def uses_reference(self) -> bool:
        """DPO's loss always compares with the reference."""
        return True

    @property
    def micro_batch_rows(self) -> int:
        """Completions a micro-batch holds: two per prompt (per_device_train_batch_size counts prompts, as TRL)."""
        return 2 * self.args.per_device_train_batch_size

    def __init__(self, model, ref_model=None, reward_funcs=None, args: OnlineDPOConfig | None = None, **kwargs):
        if ref_model is not None:
            raise ConfigError("OnlineDPOTrainer(ref_model=...): fasttune's reference is the policy as handed over "
                              "with its LoRA adapters off (TRL's PEFT path); leave ref_model out.")
        if kwargs.get("eval_dataset") is not None:
            raise ConfigError("OnlineDPOTrainer does not evaluate (TRL's OnlineDPOTrainer has no evaluation of its "
                              "own); leave eval_dataset out.")
        super().__init__(model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.aux_weight = 0.0  # (TRL's online DPO adds no MoE load-balancing loss)

    def current_beta(self) -> float:
        """beta for the current epoch: its entry of a per-epoch list, the last one after the list."""
        betas = self.args.betas
        epoch = int(self.state.epoch or 0)
        return betas[min(epoch, len(betas) - 1)]

    def _micro_batch(self, examples, completion_ids, truncated, advantages) -> dict:
        """GRPO's micro-batch, each prompt first cut from the left to max_length - the longest completion's length
        (TRL's truncation; not for rows with images, whose image tokens it would cut)."""
        width = max(len(c) for c in completion_ids)
        keep = max(self.args.max_length - width, 0)
        if not self.vision and any(len(ex["prompt_ids"]) > keep for ex in examples):
            examples = [{**ex, "prompt_ids": ex["prompt_ids"][-keep:] if keep else []} for ex in examples]
        return super()._micro_batch(examples, completion_ids, truncated, advantages)

    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """Rewards (weighted sum over the functions that scored, minus missing_eos_penalty for a completion without
        a stop token) -> which completion of each consecutive pair is chosen -> micro-batches (whole pairs) with the
        reference's log-probs, each carrying `chosen` (pairs,) long: 0 or 1, the chosen one's place in its pair."""
        a = self.args
        rewards_per_func = self.compute_rewards(examples, completion_ids)
        rollout = self.gather_rollout(rewards_per_func, completion_ids, truncated, across_ranks)
        self._check_unrewarded(rollout.rewards_per_func)
        rewards = (rollout.rewards_per_func * self.reward_weights[None]).nansum(dim=1)
        if a.missing_eos_penalty is not None:
            rewards = rewards - a.missing_eos_penalty * torch.tensor(rollout.truncated, dtype=torch.float32)
        pairs = rewards.view(-1, 2)
        chosen = (pairs[:, 0] < pairs[:, 1]).long()  # the first on a tie (TRL: first_half >= second_half)
        self._record_pairs(rollout, rewards, pairs, chosen)
        self.keep_completions(rollout, None, across_ranks)
        mine = rollout.mine(chosen.repeat_interleave(2))  # per completion: its pair's choice
        batches = self.micro_batches(examples, completion_ids, truncated, torch.zeros(len(examples)), sizes)
        start = 0
        for b in batches:
            n = b["input_ids"].shape[0]
            b["chosen"] = mine[start:start + n:2].clone()
            b["rewards"] = rollout.mine(rewards)[start:start + n].clone()
            start += n
        return batches

    def _record_pairs(self, rollout, rewards: torch.Tensor, pairs: torch.Tensor, chosen: torch.Tensor):
        """The step's reward metrics (TRL's objective/scores, objective/scores_margin, val/contain_eos_token, and
        the per-function means) and completion lengths."""
        rec = self._metrics
        for j, name in enumerate(self.reward_names):
            rec[f"rewards/{name}/mean"].append(float(torch.nanmean(rollout.rewards_per_func[:, j])))
        rows = torch.arange(pairs.shape[0])
        rec["objective/scores"].append(float(rewards.mean()))
        rec["objective/scores_margin"].append(float((pairs[rows, chosen] - pairs[rows, 1 - chosen]).mean()))
        rec["val/contain_eos_token"].append(1.0 - sum(rollout.truncated) / len(rollout.truncated))
        rec["beta"].append(self.current_beta())
        self._record_lengths(rollout)

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO's loss over the micro-batch's pairs (module docstring), their mean, not divided by the step's
        micro-batches (TRL's); the logged part is that mean / the step's micro-batches, so the step's logged loss is
        the micro-batches' mean."""
        mask = batch["completion_mask"]
        token_logps, _, _ = self.policy_logps(batch)
        beta, m = self.current_beta(), mask.to(token_logps.dtype)
        logps = (token_logps * m).sum(-1).view(-1, 2)
        ref = (batch["ref_logps"].to(token_logps.dtype) * m).sum(-1).view(-1, 2)
        rows = torch.arange(logps.shape[0], device=logps.device)
        first = batch["chosen"].to(logps.device)
        chosen, rejected = logps[rows, first], logps[rows, 1 - first]
        ref_chosen, ref_rejected = ref[rows, first], ref[rows, 1 - first]
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        if self.args.loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * logits)
        else:
            losses = (logits - 1 / (2 * beta)) ** 2
        loss = losses.mean()
        with torch.no_grad():
            self._pair_metrics(token_logps.detach(), batch, m, chosen.detach(), rejected.detach(),
                               ref_chosen, ref_rejected, beta)
        return loss, loss.detach().to(torch.float64) * num_items / int(batch["steps"])

    def _pair_metrics(self, token_logps, batch, m, chosen, rejected, ref_chosen, ref_rejected, beta: float):
        """TRL's per-micro-batch metrics (each a mean over the micro-batch, averaged over the logged steps)."""
        kl = ((token_logps - batch["ref_logps"].to(token_logps.dtype)) * m).sum(-1)  # per completion
        non_score = -beta * kl
        rewards = batch["rewards"].to(kl.device, kl.dtype)
        chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        margins = chosen_rewards - rejected_rewards
        for name, values in (("objective/kl", kl), ("objective/non_score_reward", non_score),
                             ("objective/rlhf_reward", rewards + non_score),
                             ("objective/entropy", -(token_logps * m).sum(-1)), ("logps/chosen", chosen),
                             ("logps/rejected", rejected), ("rewards/chosen", chosen_rewards),
                             ("rewards/rejected", rejected_rewards), ("rewards/margins", margins),
                             ("rewards/accuracies", (margins > 0).float())):
            self._add_ratio(name, values.sum(), values.numel())
