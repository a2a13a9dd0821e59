"""What GRPO and RLOO do with sampled completions before the loss: the reward functions' scores (TRL's calling
convention: train/rewards.py), the stop after too many unrewarded steps, and TRL's rollout metrics (reward,
rewards/<name>/*, completions/*, kl, clip_ratio/*), merged into each log entry. A mixin of GRPOTrainer."""
from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from fasttune.errors import ConfigError, FastTuneError
from fasttune.train.host_reads import host_values
from fasttune.train.objectives.completions_log import CompletionsLog
from fasttune.train.objectives.grpo_loss import nanstd
from fasttune.train.rewards import is_async_callable, run_async


def _no_completions_table(column: str, values: list):
    """TRL's `log_extra` for reward functions adds a column to its table of logged completions: without
    log_completions there is no table, so the values are dropped (as TRL keeps them unshown)."""


class NoRewardError(FastTuneError):
    """No reward function scored any completion for max_unrewarded_steps steps in a row."""


@dataclass
class Rollout:
    """A step's scored completions, over every rank in rank order when gathered (RewardScoring.gather_rollout):
    rewards_per_func (N, F) float32 (NaN where a function returned None), each completion's length in tokens and
    whether it was truncated, `extra` (N,) per-completion values an objective gathers with them (RLOO's KL), and
    this rank's own completions as rows offset .. offset + count."""

    rewards_per_func: torch.Tensor
    lengths: list
    truncated: list
    offset: int
    count: int
    extra: torch.Tensor | None = None

    def mine(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's rows of per-completion values (N, ...)."""
        return values[self.offset:self.offset + self.count]


def metric_windows() -> tuple[dict, dict]:
    """Empty metric windows: name -> per-step values (averaged into the next log entry), and name -> the (sum,
    count) of each micro-batch in the window (tensors kept on the device until read)."""
    return defaultdict(list), defaultdict(list)


class RewardScoring:
    """Scoring and metrics of the online objectives. The trainer provides `args` (max_unrewarded_steps),
    `tokenizer`, `reward_funcs`, `reward_names` and `state`; start_metrics() sets up the metric windows."""

    # Conversational prompts' completions reach the reward functions as one assistant message (TRL's GRPO); False:
    # as decoded text always (TRL's A2PO)
    chat_completions = True

    def start_metrics(self):
        """Empty metric windows, the unrewarded-step count and (log_completions) the completions table."""
        self._metrics, self._ratios = metric_windows()
        self._unrewarded_in_row = 0  # steps in a row with no reward at all (see _check_unrewarded)
        a = self.args
        self._completions = CompletionsLog(self.reward_names, a.num_completions_to_print, a.log_unique_prompts) \
            if a.log_completions else None
        self._scored = ([], [])  # the prompts and completions the reward functions got last

    def _check_unrewarded(self, rewards_per_func: torch.Tensor):
        """A step where every reward function returned None for every completion teaches nothing (advantages 0):
        after max_unrewarded_steps such steps in a row, stop."""
        if not torch.isnan(rewards_per_func).all():
            self._unrewarded_in_row = 0
            return
        self._unrewarded_in_row += 1
        n = self._unrewarded_in_row
        if n >= self.args.max_unrewarded_steps:
            raise NoRewardError(
                f"Every reward function ({', '.join(self.reward_names)}) returned None for every completion, "
                f"{n} steps in a row: these steps have no reward to learn from (loss 0), so training stopped. Make "
                f"at least one reward function return a number for each completion (None only where it does not "
                f"apply), or raise max_unrewarded_steps (now {self.args.max_unrewarded_steps}).")

    def compute_rewards(self, examples: list[dict], completion_ids: list[list[int]]) -> torch.Tensor:
        """(completions, reward functions) float32, NaN where a function returned None."""
        if not examples:  # a rank with no completions in an epoch's short last step
            self._scored = ([], [])
            return torch.zeros(0, len(self.reward_funcs))
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [ex["prompt"] for ex in examples]
        chat = self.chat_completions and not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        turns = getattr(self, "_turns", None)
        if turns is not None and turns.messages is not None:  # a tool loop ran: parsed turns and tool results
            completions = copy.deepcopy(turns.messages)
        columns = {k: [ex["columns"].get(k) for ex in examples] for k in examples[0]["columns"]}
        out = torch.zeros(len(examples), len(self.reward_funcs))
        self._scored = (prompts, completions)
        log_extra = _no_completions_table if self._completions is None else self._completions.add_extra
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
                      trainer_state=self.state, log_metric=self._log_metric, log_extra=log_extra)
        if getattr(self, "_rollout_envs", None) is not None:  # TRL's: the rollouts' environment instances
            kwargs["environments"] = self._rollout_envs
        calls = {j: func(**kwargs) for j, func in enumerate(self.reward_funcs) if not is_async_callable(func)}
        pending = {j: func for j, func in enumerate(self.reward_funcs) if is_async_callable(func)}
        if pending:  # async reward functions run concurrently, on one event loop kept across steps (as TRL)
            calls.update(zip(pending, run_async([func(**kwargs) for func in pending.values()])))
        for j, name in enumerate(self.reward_names):
            values = list(calls[j]) if calls[j] is not None else []
            if len(values) != len(examples):
                raise ConfigError(f"The reward function '{name}' returned {len(values)} rewards for "
                                  f"{len(examples)} completions; return one float (or None) per completion.")
            try:
                out[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
            except (TypeError, ValueError):
                raise ConfigError(f"The reward function '{name}' returned a value that is not a number "
                                  f"({values[:3]!r}...); return floats (or None for 'not applicable').") from None
        unscored = torch.isnan(out).all(dim=1)
        if unscored.any():  # TRL's warning, with the first such completion's inputs
            i = int(unscored.nonzero()[0, 0])
            kwargs = {k: v[i] for k, v in columns.items()}
            kwargs.update(prompt=prompts[i], completion=completions[i])
            warnings.warn(f"All reward functions returned None for the following kwargs:\n{kwargs}\n"
                          f"Please ensure that at least one reward function returns a valid reward.", UserWarning,
                          stacklevel=2)
        return out

    def gather_rollout(self, rewards_per_func: torch.Tensor, completion_ids: list, truncated: list,
                       across_ranks: bool, extra: torch.Tensor | None = None) -> Rollout:
        """This rank's scored completions (rewards (n, F), their ids, truncated flags, optional extra (n,)) as a
        Rollout; across_ranks under torchrun: every rank's, gathered on the host in rank order (every rank calls it
        once per step), so group statistics see groups that span ranks as TRL's gather does."""
        turns = getattr(self, "_turns", None)
        # (after a tool loop, the model's own tokens only, as TRL counts them)
        lengths = [len(c) for c in completion_ids] if turns is None else [sum(m) for m in turns.tool_masks]
        if not (across_ranks and self.dist.active):
            return Rollout(rewards_per_func, lengths, list(truncated), 0, len(lengths), extra)
        parts = self.dist.gather((rewards_per_func, lengths, list(truncated), extra))
        offset = sum(len(p[1]) for p in parts[:self.dist.rank])
        return Rollout(torch.cat([p[0] for p in parts]), [n for p in parts for n in p[1]],
                       [t for p in parts for t in p[2]], offset, len(lengths),
                       None if extra is None else torch.cat([p[3] for p in parts]))

    def keep_completions(self, rollout: Rollout, advantages: torch.Tensor | None, across_ranks: bool):
        """log_completions: keep the training step's table (every rank's rows, gathered in rank order, with the
        step's rewards and advantages (N,)) for the next log entry. Evaluation's rollouts (across_ranks False)
        are not kept; their log_extra values are dropped."""
        log = self._completions
        if log is None:
            return
        prompts, completions = self._scored
        extra = log.take_extra(len(prompts))
        if not across_ranks:
            return
        parts = self.dist.gather((prompts, completions, extra)) if self.dist.active else [(prompts, completions, extra)]
        columns = sorted({c for part in parts for c in part[2]})
        log.keep([p for part in parts for p in part[0]], [c for part in parts for c in part[1]],
                 rollout.rewards_per_func, advantages,
                 {c: [v for part in parts for v in part[2].get(c, [None] * len(part[0]))] for c in columns})

    # --- metrics (TRL's names), merged into each training log entry --------------------------------------------
    def _record_rollout(self, rollout: Rollout, rewards: torch.Tensor, std: torch.Tensor):
        rewards_per_func, rec = rollout.rewards_per_func, self._metrics
        for j, name in enumerate(self.reward_names):
            rec[f"rewards/{name}/mean"].append(float(torch.nanmean(rewards_per_func[:, j])))
            rec[f"rewards/{name}/std"].append(float(nanstd(rewards_per_func[:, j])))
        rec["reward"].append(float(torch.nanmean(rewards)))
        rec["reward_std"].append(float(nanstd(rewards)))
        rec["frac_reward_zero_std"].append(float(torch.isclose(std, torch.zeros_like(std)).float().mean()))
        self._record_lengths(rollout)

    def _record_lengths(self, rollout: Rollout):
        """TRL's completions/* metrics of the rollout's completions (lengths in tokens, truncated share)."""
        rec, truncated = self._metrics, rollout.truncated
        lengths = torch.tensor(rollout.lengths, dtype=torch.float32)
        rec["completions/mean_length"].append(float(lengths.mean()))
        rec["completions/min_length"].append(float(lengths.min()))
        rec["completions/max_length"].append(float(lengths.max()))
        rec["completions/clipped_ratio"].append(sum(truncated) / len(truncated))
        ended = lengths[~torch.tensor(truncated, dtype=torch.bool)]
        ended = ended if ended.numel() else torch.zeros(1)  # none ended with a stop token: 0, as TRL logs it
        rec["completions/mean_terminated_length"].append(float(ended.mean()))
        rec["completions/min_terminated_length"].append(float(ended.min()))
        rec["completions/max_terminated_length"].append(float(ended.max()))

    def _log_metric(self, name: str, value: float):
        """TRL's `log_metric` for reward functions: `value` joins the metric `name`, averaged into the next log
        entry."""
        self._metrics[name].append(float(value))

    def _add_ratio(self, name: str, s, n):
        """A micro-batch's (sum, count) of the metric `name` (its mean is s / n); tensors stay on the device until
        step_metrics reads them."""
        self._ratios[name].append((s, n))

    def step_metrics(self, across_ranks: bool = False) -> dict:
        """TRL's GRPO metrics (reward, reward_std, rewards/<func>/mean, completions/*, kl, clip_ratio/*) averaged
        over the steps since the last log entry; resets them. Under torchrun every rank calls it: the ratio metrics
        take each micro-batch's (sum, count) over the ranks (the k-th of each), as TRL reduces them; across_ranks
        (evaluation, where each rank samples its share of the batches) also merges every rank's other entries. A
        training entry (not across_ranks) also shows and writes the latest step's completions table when
        log_completions is set."""
        if not across_ranks and self._completions is not None:
            self._completions.emit(self.state.global_step, self.args.output_dir, self.dist.is_main)
        values = iter(host_values([x for pairs in self._ratios.values() for pair in pairs for x in pair]))  # one read
        pairs = {k: [(next(values), next(values)) for _ in v] for k, v in self._ratios.items()}
        lists = {k: list(v) for k, v in self._metrics.items()}
        if self.dist.active:
            # TRL reduces each micro-batch's (sum, count) over the ranks: the k-th micro-batch of every rank together
            parts = self.dist.gather((lists if across_ranks else {}, pairs))
            if across_ranks:  # (in training the rollout lists are already every rank's)
                lists = defaultdict(list)
                for part_lists, _ in parts:
                    for k, v in part_lists.items():
                        lists[k].extend(v)
            pairs = {k: [tuple(sum(p[k][i][j] for _, p in parts if i < len(p.get(k, ()))) for j in (0, 1))
                         for i in range(max(len(p.get(k, ())) for _, p in parts))]
                     for k in {k for _, p in parts for k in p}}
        out = {k: sum(v) / len(v) for k, v in lists.items() if v}
        # TRL's ratio metrics: each micro-batch's mean (0 without items), averaged over the window's micro-batches
        out.update({k: sum(s / n if n else 0.0 for s, n in v) / len(v) for k, v in pairs.items() if v})
        self._metrics.clear()
        self._ratios.clear()
        return out
