"""A*-PO (Brantley et al. 2025, "Accelerating RL for LLM Reasoning with Optimal Advantage Regression",
arXiv:2505.20686) as TRL 1.16's experimental A2POTrainer computes it, on GRPO's sampling and reward scoring (grpo.py).

Stage 1, once before training: num_value_samples completions per prompt from the reference (the policy as handed to
the trainer), scored by the reward functions (r: their weighted sum, which A*-PO assumes is 0 or 1), give the
prompt's optimal value V*(x) = beta1 (logsumexp_i(r_i / beta1) - log n); with filter_all_incorrect the prompts whose
samples all scored 0 leave the training set (no learning signal).
Stage 2, each step: one completion per prompt from the policy; the loss is the mean over the micro-batch of
(beta2 (log pi(y|x) - log pi_ref(y|x)) - (r - V*(x)))^2, log pi the completion's summed token log-probs.

TRL's choices kept so that the numbers equal its trainer's: log-probs at temperature 1 with the model's default
positions (TRL's forward passes no position ids, so a left-padded prompt starts at the padding); the reward functions
get each completion as decoded text (conversational prompts too) and the row's other columns; the micro-batch losses
are averaged over gradient accumulation (transformers' Trainer divides each by the step's micro-batches); V* is kept
per prompt (by its tokens; TRL keys it by the prompt's text), eval prompts estimated with the training ones. Where this
one differs: a reward function's None counts as no score (the weighted sum of the others; TRL cannot take None); a
prompt is dropped when every sample scored exactly 0 (TRL: when their sum is 0, the same for 0/1 rewards); a prompt
first met at evaluation (evaluate(dataset)) is estimated then (TRL fails); V* is estimated again when a run resumes
from a checkpoint (the same seeded samples, so the same values), as TRL does.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fasttune.errors import ConfigError, DataError
from fasttune.train.fsdp import shard_model
from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import OnlineRLConfig

__all__ = ["A2POTrainer", "A2POConfig"]

STAGE1_SEED = 9_000_011  # stage 1's sampling seeds: args.seed + this + the prompt chunk's index


@dataclass
class A2POConfig(OnlineRLConfig):
    """OnlineRLConfig with TRL 1.16 A2POConfig's fields and defaults: one completion per prompt in training
    (num_generations stays 1, so per_device_train_batch_size counts prompts), max_prompt_length 512 (longer prompts
    keep their last tokens), num_value_samples 8 (stage 1's samples per prompt), beta1 0.5 (stage 1's temperature),
    filter_all_incorrect True, beta2 1e-3 (stage 2's KL temperature), top_k None or 0 (off). Raises ConfigError for
    num_value_samples < 1, beta1 or beta2 <= 0, num_generations (or num_generations_eval) other than 1, and the
    GRPO settings A*-PO does not have (beta, num_iterations, steps_per_generation, generation_batch_size,
    mask_truncated_completions)."""

    min_generations = 1  # (a class setting: A*-PO samples one completion per prompt)
    num_generations: int = 1
    max_prompt_length: int | None = 512
    top_k: int | None = 0  # TRL's None (no top-k filtering) is read as 0
    num_value_samples: int = 8
    beta1: float = 0.5
    filter_all_incorrect: bool = True
    beta2: float = 1e-3

    def __post_init__(self):
        if self.top_k is None:
            self.top_k = 0
        super().__post_init__()
        if not isinstance(self.num_value_samples, int) or isinstance(self.num_value_samples, bool) \
                or self.num_value_samples < 1:
            raise ConfigError(f"num_value_samples={self.num_value_samples!r} is invalid: stage 1 samples this many "
                              f"completions per prompt to estimate V*, a whole number >= 1 (TRL's default is 8).")
        for name, default in (("beta1", 0.5), ("beta2", 1e-3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} is invalid: A*-PO's KL temperatures must be > 0 (TRL's default "
                                  f"is {default}).")
        if self.num_generations != 1 or self.num_generations_eval not in (None, 1):
            raise ConfigError(f"num_generations={self.num_generations} / num_generations_eval="
                              f"{self.num_generations_eval} is invalid for A2PO: it samples one completion per "
                              f"prompt (stage 1's count is num_value_samples); leave them out.")
        for name, default in (("beta", 0.0), ("num_iterations", 1), ("steps_per_generation", None),
                              ("generation_batch_size", None), ("mask_truncated_completions", False)):
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r} does not apply to A2PO (TRL's A2POConfig has no "
                                  f"such setting; its KL temperatures are beta1 and beta2); leave it out.")


class A2POTrainer(GRPOTrainer):
    """A*-PO on rows with a `prompt` (module docstring), as TRL 1.16's trl.experimental.a2po A2POTrainer:
    GRPOTrainer's arguments (model, reward_funcs: callables, built-in names or reward models, args, train_dataset,
    eval_dataset, processing_class, ...) with A2POConfig. The reference is the policy as handed to the trainer, as
    TRL's frozen copy (the base with the adapters off for a fresh adapter, else a copy of the adapter; with full
    fine-tuning a copy of every weight). Stage 1 runs when train() starts (estimate_optimal_values). Logs TRL's metrics
    (reward, v_star, implicit_reward, advantage: means over the micro-batches since the last entry) with
    rewards/<name>/mean and completions/*. Raises ConfigError as GRPOTrainer, and for a vision-language model (TRL's
    A2PO reads text prompts only)."""

    config_cls = A2POConfig
    takes_tools = False  # (TRL's trainer of this name samples in one turn)
    packing_refusal = "packing does not apply to A2PO (completions are sampled per step); set packing=False."
    chat_completions = False  # TRL's A2PO hands the reward functions decoded text
    scores_as_sampled = False  # temperature 1, the model's default positions (module docstring)

    @property
    def uses_reference(self) -> bool:
        """A*-PO regresses the log-ratio to the reference, always."""
        return True

    def __init__(self, model, reward_funcs=None, args: A2POConfig | None = None, **kwargs):
        super().__init__(model, reward_funcs=reward_funcs, args=args, **kwargs)
        if self.vision:
            raise ConfigError("A2POTrainer reads text prompts only (as TRL's A2PO); load a language model, or train "
                              "a vision-language model with GRPOTrainer.")
        self.aux_weight = 0.0  # (TRL's A2PO adds no MoE load-balancing loss)
        self._values: dict[tuple, float] = {}  # prompt tokens -> V*
        self._stage1_done = False

    # --- stage 1 -----------------------------------------------------------------------------------------------
    @staticmethod
    def _key(example: dict) -> tuple:
        return tuple(example["prompt_ids"])

    def estimate_optimal_values(self):
        """Stage 1 (once): V* of every training and eval prompt from num_value_samples reference samples each (under
        torchrun each rank samples a share, and the values are gathered); with filter_all_incorrect, drops the
        training prompts whose samples all scored 0 (printed). Raises DataError when that leaves no prompt."""
        if self._stage1_done:
            return
        a, examples = self.args, self.train_examples + (self.eval_examples or [])
        unique = list({self._key(ex): ex for ex in examples}.values())
        zero = self._estimate(unique, across_ranks=True)
        if a.filter_all_incorrect:
            kept = [ex for ex in self.train_examples if self._key(ex) not in zero]
            if not kept:
                raise DataError(f"A2PO stage 1: all {a.num_value_samples} reference samples of every training prompt "
                                f"scored 0, so no prompt is left to learn from (filter_all_incorrect drops them). "
                                f"Check the reward functions, raise num_value_samples or max_completion_length, or "
                                f"set filter_all_incorrect=False.")
            dropped = len(self.train_examples) - len(kept)
            if dropped and self.dist.is_main:
                print(f"fasttune: A2PO stage 1 dropped {dropped} of {len(self.train_examples)} training prompts: all "
                      f"their reference samples scored 0 (filter_all_incorrect).", file=sys.stderr)
            self.train_examples = kept
        self._stage1_done = True

    @torch.no_grad()
    def _estimate(self, prompts: list[dict], across_ranks: bool) -> set:
        """V* of each of `prompts` (distinct), kept in self._values; returns the keys of those whose samples all
        scored 0. Prompts go per_device_train_batch_size at a time (each chunk's samples seeded by its index);
        across_ranks under torchrun: each rank takes every world-th chunk and the results are gathered."""
        a, n = self.args, self.args.num_value_samples
        per = a.per_device_train_batch_size
        chunks = list(range(0, len(prompts), per))
        if across_ranks and self.dist.active:
            chunks = chunks[self.dist.rank::self.dist.world]
        values, zero = {}, set()
        bar = tqdm(total=sum(len(prompts[start:start + per]) for start in chunks), desc="A2PO stage 1 (V*)",
                   unit="prompt", dynamic_ncols=True, disable=not self.dist.is_main or len(chunks) < 2)
        try:
            for start in chunks:
                chunk = prompts[start:start + per]
                group = [ex for ex in chunk for _ in range(n)]
                with self.reference.active():
                    completion_ids, _ = self.sample(group, a.seed + STAGE1_SEED + start // per)
                v_star, all_zero = self.optimal_values(group, completion_ids)
                for ex, v, z in zip(chunk, v_star.tolist(), all_zero.tolist()):
                    values[self._key(ex)] = v
                    if z:
                        zero.add(self._key(ex))
                bar.update(len(chunk))
        finally:
            bar.close()
        if across_ranks and self.dist.active:
            parts = self.dist.gather((values, zero))
            values, zero = {k: v for part in parts for k, v in part[0].items()}, set().union(*(p[1] for p in parts))
        self._values.update(values)
        return zero

    def optimal_values(self, examples: list[dict], completion_ids: list[list[int]]) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """From num_value_samples consecutive completions per prompt (`examples` repeated alike): (V* (prompts,)
        float32 = beta1 (logsumexp(r / beta1) - log n), whether all n rewards are 0 (prompts,) bool), r the
        completions' weighted rewards."""
        n, beta1 = self.args.num_value_samples, self.args.beta1
        rewards = self.weighted_rewards(self.compute_rewards(examples, completion_ids)).view(-1, n)
        return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(n)), (rewards == 0).all(dim=1)

    def weighted_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """(N,) float32: the reward functions' weighted sum per completion, a function's None (NaN) left out."""
        return (rewards_per_func * self.reward_weights[None]).nansum(dim=1)

    def _train(self, resume_from_checkpoint):
        if self.args.fsdp:
            # Under FSDP stage 1 samples after sharding (from_pretrained(fsdp=True) leaves ranks after the first
            # without weights until then), with the model gathered whole: each rank samples its own share of the
            # prompts, a different number of forwards (the training loop's own shard_model call is then a no-op).
            shard_model(self.model)
        with self.gathered():
            self.estimate_optimal_values()
        return super()._train(resume_from_checkpoint)

    # --- stage 2 -----------------------------------------------------------------------------------------------
    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """Rewards and the prompts' V* (a prompt not estimated yet is estimated now) -> micro-batches of `sizes`
        completions with the reference's log-probs, each carrying `rewards` and `v_star` (rows,) float32; records
        TRL's reward and v_star metrics per micro-batch."""
        rollout = self.gather_rollout(self.compute_rewards(examples, completion_ids), completion_ids, truncated,
                                      across_ranks)
        self._check_unrewarded(rollout.rewards_per_func)
        rewards = self.weighted_rewards(rollout.rewards_per_func)
        rec = self._metrics
        for j, name in enumerate(self.reward_names):
            rec[f"rewards/{name}/mean"].append(float(torch.nanmean(rollout.rewards_per_func[:, j])))
        self._record_lengths(rollout)
        self.keep_completions(rollout, None, across_ranks)
        missing = list({self._key(ex): ex for ex in examples if self._key(ex) not in self._values}.values())
        if missing:
            self._estimate(missing, across_ranks=False)
        v_star = torch.tensor([self._values[self._key(ex)] for ex in examples], dtype=torch.float32)
        mine = rollout.mine(rewards)
        batches = self.micro_batches(examples, completion_ids, truncated, torch.zeros(len(examples)), sizes)
        start = 0
        for b in batches:
            n = b["input_ids"].shape[0]
            b["rewards"], b["v_star"] = mine[start:start + n].clone(), v_star[start:start + n].clone()
            self._add_ratio("reward", b["rewards"].sum(), n)
            self._add_ratio("v_star", b["v_star"].sum(), n)
            start += n
        return batches

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean over the micro-batch of (beta2 (log pi - log pi_ref) - (r - V*))^2 (module docstring), divided by
        the step's micro-batches in training (transformers' Trainer's scaling); the logged part makes the step's
        logged loss the micro-batches' mean."""
        mask = batch["completion_mask"]
        logps = self.completion_logps(batch["input_ids"], batch["attention_mask"], mask.shape[1],
                                      batch.get("completion_positions"))
        m = mask.to(logps.dtype)
        implicit = self.args.beta2 * ((logps * m).sum(-1) - (batch["ref_logps"].to(logps.dtype) * m).sum(-1))
        target = (batch["rewards"] - batch["v_star"]).to(implicit.device, implicit.dtype)
        steps = int(batch["steps"]) if self.model.training else 1
        loss = ((implicit - target) ** 2).mean() / steps
        with torch.no_grad():
            self._add_ratio("implicit_reward", implicit.detach().sum(), implicit.numel())
            self._add_ratio("advantage", target.sum(), target.numel())
        return loss, loss.detach().to(torch.float64) * num_items
