"""SDPO (Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation", arXiv:2601.20802) as TRL 1.16's
experimental SDPOTrainer computes it: GRPO's sampling and rewards, and self-distillation (self_distillation.py) from
the model's own successful completions, where the teacher is the model shown a sibling completion that succeeded.

Per completion y_i of a prompt's group, the teacher's prompt is reprompt_template filled with the prompt (a chat
prompt: its last user message's text), the solution (solution_template around the first other completion of the
group whose reward reaches success_reward_threshold; the completion itself too with dont_reprompt_on_self_success
False) and, with include_environment_feedback, the row's `privileged_context` as feedback (feedback_template; only
where no solution was found with environment_feedback_only_without_solution). A completion with neither is not
distilled. The teacher's prompt keeps its last max_reprompt_len tokens.

The loss is distillation_weight x the distillation loss (over the distilled completions' tokens) + (1 -
distillation_weight) x the policy loss: GRPO's clipped surrogate -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)
with group-normalised advantages A (scale_rewards) and r the ratio to the sampling policy (per token, or per
completion with importance_sampling_level="sequence"), reduced per micro-batch by loss_type ("grpo": the mean of
the completions' token means; "bnpo" / "dapo": the micro-batch's token mean; "dr_grpo": the token sum / (completions x
max_completion_length)). Log-probs at the sampling temperature. Over gradient accumulation the micro-batches' losses
are averaged (TRL's loss_is_scaled_for_ga).
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from fasttune.data.prompts import encode_prompt
from fasttune.errors import ConfigError
from fasttune.train.objectives.grpo_loss import group_advantages, nanstd
from fasttune.train.objectives.self_distillation import (SelfDistillationConfig, SelfDistillationTrainer,
                                                          rewritten_prompt)

__all__ = ["SDPOTrainer", "SDPOConfig"]

SDPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class SDPOConfig(SelfDistillationConfig):
    """SelfDistillationConfig plus TRL 1.16 SDPOConfig's fields, with its defaults (num_generations 8,
    distillation_mode "sampled_token" with distillation_alpha 1, teacher_model_kind "ema", distillation_weight 1:
    self-distillation alone). Raises ConfigError as SelfDistillationConfig, and for a loss_type outside
    SDPO_LOSS_TYPES, scale_rewards outside group / batch / none, importance_sampling_level outside token / sequence,
    distillation_weight outside [0, 1], max_reprompt_len < 1, diagnostics_warning_interval < 0, a template that does
    not format with its fields, and GRPO's beta (SDPO's loss has no KL term)."""

    distillation_alpha: float = 1.0
    distillation_mode: str = "sampled_token"
    distillation_topk: int | None = None
    teacher_model_kind: str = "ema"
    loss_type: str = "dapo"
    epsilon: float = 0.2
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    distillation_weight: float = 1.0  # 1: self-distillation alone; 0: the policy loss alone
    dont_reprompt_on_self_success: bool = True  # a completion is never its own solution
    max_reprompt_len: int = 10240
    use_successful_as_teacher: bool = True
    success_reward_threshold: float = 1.0
    reprompt_template: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    solution_template: str = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
    feedback_template: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
    include_environment_feedback: bool = False  # the row's privileged_context as feedback in the teacher's prompt
    environment_feedback_only_without_solution: bool = False
    remove_thinking_from_demonstration: bool = False  # <think>...</think> cut out of the solution
    diagnostics_warning_interval: int = 10  # warn on the 1st and every n-th degenerate step in a row; 0: never
    diagnostics_flat_tolerance: float = 1e-8

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super().__post_init__()
        for name, allowed in (("loss_type", SDPO_LOSS_TYPES), ("scale_rewards", ("group", "batch", "none")),
                              ("importance_sampling_level", ("token", "sequence"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported by SDPO; use one of {allowed}.")
        if not 0.0 <= self.distillation_weight <= 1.0:
            raise ConfigError(f"distillation_weight={self.distillation_weight} is invalid: in [0, 1] (1: "
                              f"self-distillation alone, 0: the policy loss alone).")
        for name, low in (("max_reprompt_len", 1), ("diagnostics_warning_interval", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} is invalid: a whole number >= {low}.")
        for name, fields in (("reprompt_template", ("prompt", "solution", "feedback")),
                             ("solution_template", ("successful_previous_attempt",)),
                             ("feedback_template", ("feedback_raw",))):
            try:
                getattr(self, name).format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise ConfigError(f"{name}={getattr(self, name)!r} does not format ({type(e).__name__}: {e}); its "
                                  f"fields are {{{'}, {'.join(fields)}}} (write literal braces as {{{{ }}}}).") \
                    from None
        if self.beta != 0.0:
            raise ConfigError(f"beta={self.beta} does not apply to SDPO: its loss has no KL term (TRL's SDPOConfig "
                              f"keeps the field but does not use it); leave it at 0.")


class SDPOTrainer(SelfDistillationTrainer):
    """SDPO on rows with a `prompt` (and, for include_environment_feedback, a `privileged_context`: feedback text),
    as TRL 1.16's trl.experimental.sdpo SDPOTrainer: GRPOTrainer's arguments (model, reward_funcs: callables,
    built-in names or reward models, args: SDPOConfig, train_dataset, eval_dataset, processing_class,
    reward_processing_classes, callbacks, optimizers, peft_config). Logs TRL's metrics: self_distillation/
    {distillation_loss, policy_loss, success_group_fraction, success_sample_fraction, feedback_available_fraction,
    feedback_used_fraction, reprompt_sample_fraction, reward_mean, reward_std, reward_min, reward_max,
    group_reward_std_mean, flat_group_fraction, rewards/<name>}, sdpo/distillation_loss, completions/*; warns (every
    diagnostics_warning_interval steps in a row) when the rewards are flat or no completion succeeds. Raises
    ConfigError as SelfDistillationTrainer."""

    config_cls = SDPOConfig
    packing_refusal = "packing does not apply to SDPO (completions are sampled per step); set packing=False."
    metric_name = "sdpo"

    def __init__(self, model, reward_funcs=None, args: SDPOConfig | None = None, **kwargs):
        super().__init__(model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._check_teacher()
        self.eps_high = self.args.epsilon_high if self.args.epsilon_high is not None else self.args.epsilon
        self._degenerate = {"train": defaultdict(int), "eval": defaultdict(int)}  # steps in a row, per warning
        self._feedback_warned = False  # (the unused-feedback warning is given once)

    def extend_example(self, example: dict, row: dict, where: str, limit: int) -> bool:
        """A chat prompt must end with the user's turn, which the teacher's prompt rewrites: DataError naming the row
        here rather than mid-training."""
        if isinstance(row.get("prompt"), list):
            rewritten_prompt(row["prompt"], lambda text: text, where, "SDPO")
        return True

    # --- scoring: rewards, advantages and the teachers' prompts ------------------------------------------------
    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """Rewards -> group advantages -> micro-batches of `sizes` completions, each with its teacher rows
        (add_teacher_rows) and `distilled` (B,) float: 1 where the completion has a solution or feedback to learn
        from. Groups (of `group` completions, default num_generations) may span ranks under torchrun: rewards,
        completions and feedback are gathered."""
        a = self.args
        g = group or a.num_generations
        rollout = self.gather_rollout(self.compute_rewards(examples, completion_ids), completion_ids, truncated,
                                      across_ranks)
        self._check_unrewarded(rollout.rewards_per_func)
        advantages, rewards, _ = group_advantages(rollout.rewards_per_func, self.reward_weights, g, a.scale_rewards)
        feedback = [ex["columns"].get("privileged_context") for ex in examples]
        everyone = [(completion_ids, feedback)]
        if across_ranks and self.dist.active:
            everyone = self.dist.gather((completion_ids, feedback))
        all_ids = [c for part in everyone for c in part[0]]
        all_feedback = [f for part in everyone for f in part[1]]
        self._record_rewards(rollout, rewards, g)
        self.keep_completions(rollout, advantages, across_ranks)
        plans = self._teacher_plans(torch.nan_to_num(rewards, nan=float("-inf")), all_feedback, g)
        mode = "train" if self.model.training else "eval"
        self._warn_if(mode, "inactive", self._metrics["self_distillation/reprompt_sample_fraction"][-1]
                      <= a.diagnostics_flat_tolerance,
                      "SDPO self-distillation is inactive: no completion reached success_reward_threshold and no "
                      "feedback was used, so no teacher prompt was built.")
        self._warn_if(mode, "no_success", self._metrics["self_distillation/success_group_fraction"][-1]
                      <= a.diagnostics_flat_tolerance,
                      "SDPO found no successful completion in any group; if this persists, make the task easier, "
                      "shape the rewards, or lower success_reward_threshold.")
        batches = self.micro_batches(examples, completion_ids, truncated, rollout.mine(advantages), sizes)
        start = 0
        for b in batches:
            n = b["input_ids"].shape[0]
            rows = range(start, start + n)
            teacher = [self._teacher_prompt(examples[i], plans[rollout.offset + i], all_ids) for i in rows]
            self.add_teacher_rows(b, teacher)
            b["distilled"] = torch.tensor([float(plans[rollout.offset + i] != (None, False)) for i in rows])
            start += n
        return batches

    def _teacher_plans(self, rewards: torch.Tensor, feedback: list, g: int) -> list[tuple]:
        """Per completion (all ranks, in order): (the index of its solution or None, whether its feedback is used),
        as TRL's SuccessfulRolloutTeacherContextBuilder chooses them; records its metrics."""
        a = self.args
        total = rewards.shape[0]
        success = (rewards >= a.success_reward_threshold).tolist()
        plans, solved, fed, available, groups_won = [], 0, 0, 0, 0
        for i in range(total):
            start = i // g * g
            if i == start and any(success[start:start + g]):
                groups_won += 1
            demo = None
            if a.use_successful_as_teacher:
                demo = next((j for j in range(start, start + g)
                             if success[j] and not (a.dont_reprompt_on_self_success and j == i)), None)
            has_feedback = isinstance(feedback[i], str) and feedback[i].strip() != ""
            available += has_feedback
            use = a.include_environment_feedback and has_feedback and not (
                a.environment_feedback_only_without_solution and demo is not None)
            solved, fed = solved + (demo is not None), fed + use
            plans.append((demo, use))
        if available and not a.include_environment_feedback and not self._feedback_warned:
            self._feedback_warned = True
            warnings.warn("SDPO got environment feedback (privileged_context) in the rows, but "
                          "include_environment_feedback=False, so it is not used; set include_environment_feedback="
                          "True to put it in the teacher's prompt.", UserWarning, stacklevel=3)
        n, rec = max(total, 1), self._metrics
        rec["self_distillation/success_group_fraction"].append(groups_won / max(1, total // max(1, g)))
        rec["self_distillation/success_sample_fraction"].append(solved / n)
        rec["self_distillation/feedback_available_fraction"].append(available / n)
        rec["self_distillation/feedback_used_fraction"].append(fed / n)
        rec["self_distillation/reprompt_sample_fraction"].append(
            sum(p != (None, False) for p in plans) / n if total else 0.0)
        return plans

    def _teacher_prompt(self, example: dict, plan: tuple, all_ids: list) -> list[int]:
        """The teacher's prompt token ids for one completion (module docstring): the student's prompt where the plan
        has nothing to add (the completion is not distilled)."""
        a = self.args
        demo, use_feedback = plan
        if demo is None and not use_feedback:
            return example["prompt_ids"]
        solution = ""
        if demo is not None:
            ids = [t for t in all_ids[demo] if t != self.pad_id]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if a.remove_thinking_from_demonstration:
                text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
            solution = a.solution_template.format(successful_previous_attempt=text)
        feedback = a.feedback_template.format(feedback_raw=example["columns"].get("privileged_context")) \
            if use_feedback else ""
        prompt = rewritten_prompt(example["prompt"], lambda text: a.reprompt_template.format(
            prompt=text, solution=solution, feedback=feedback), "the prompt", "SDPO")
        _, ids = encode_prompt(prompt, self.tokenizer, "the teacher's prompt", **(a.chat_template_kwargs or {}))
        return ids[-a.max_reprompt_len:]

    def _record_rewards(self, rollout, rewards: torch.Tensor, g: int):
        """TRL's SDPO reward diagnostics and completions/* of the rollout (every rank's completions when gathered);
        warns when every reward is the same."""
        a, rec = self.args, self._metrics
        tol = a.diagnostics_flat_tolerance
        r = torch.nan_to_num(rewards, nan=0.0)
        # (TRL's: ones with scale_rewards="none", else each group's std, also with "batch")
        group_std = torch.ones(r.numel() // g) if a.scale_rewards == "none" else \
            nanstd(r.view(-1, g), dim=1) if g > 1 else torch.zeros(r.numel())
        spread = float(r.std()) if r.numel() > 1 else 0.0
        flat = float((group_std <= tol).float().mean()) if group_std.numel() else 1.0
        rec["self_distillation/reward_mean"].append(float(r.mean()) if r.numel() else 0.0)
        rec["self_distillation/reward_std"].append(spread)
        rec["self_distillation/reward_min"].append(float(r.min()) if r.numel() else 0.0)
        rec["self_distillation/reward_max"].append(float(r.max()) if r.numel() else 0.0)
        rec["self_distillation/group_reward_std_mean"].append(float(group_std.mean()) if group_std.numel() else spread)
        rec["self_distillation/flat_group_fraction"].append(flat)
        for j, name in enumerate(self.reward_names):
            rec[f"self_distillation/rewards/{name}"].append(float(torch.nanmean(rollout.rewards_per_func[:, j])))
        self._record_lengths(rollout)
        mode = "train" if self.model.training else "eval"
        self._warn_if(mode, "flat_rewards", spread <= tol and flat >= 1.0 - tol,
                      "Every sampled completion got the same SDPO reward: the policy's advantages are zero, so it "
                      "learns nothing from them. Check the reward functions' density and shaping, or "
                      "success_reward_threshold.")

    def _warn_if(self, mode: str, key: str, degenerate: bool, message: str):
        """TRL's degenerate-diagnostics warning: on the first step of a run of such steps and every
        diagnostics_warning_interval-th after (0: never)."""
        counts, interval = self._degenerate[mode], self.args.diagnostics_warning_interval
        if not degenerate:
            counts[key] = 0
            return
        counts[key] += 1
        if interval and (counts[key] == 1 or counts[key] % interval == 0):
            warnings.warn(f"{message} Degenerate steps in a row: {counts[key]}.", UserWarning, stacklevel=3)

    # --- the loss ----------------------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """distillation_weight x the distillation loss + (1 - distillation_weight) x the policy loss (module
        docstring), divided by the step's micro-batches in training."""
        a, mask = self.args, batch["completion_mask"]
        w = a.distillation_weight
        if w == 0.0:
            logps = self.completion_logps(batch["input_ids"], batch["attention_mask"], mask.shape[1],
                                          batch.get("completion_positions"))
            loss = self._policy_loss(batch, logps)
        else:
            keep = mask.float() * batch["distilled"].to(mask.device)[:, None]
            distill, flat = self.distillation(batch, keep, with_logps=w < 1.0)
            loss = distill
            if w < 1.0:
                logps = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask.bool(), flat)
                loss = (1.0 - w) * self._policy_loss(batch, logps) + w * distill
        loss = loss / (int(batch["steps"]) if self.model.training else 1)
        return loss, loss.detach().to(torch.float64) * num_items

    def _policy_loss(self, batch: dict, logps: torch.Tensor) -> torch.Tensor:
        """TRL's SDPO policy loss of the micro-batch from the policy's log-probs (B, n) fp32 (module docstring);
        records self_distillation/policy_loss."""
        a = self.args
        mask = batch["completion_mask"].to(logps.dtype)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        adv = batch["advantages"].to(logps.device, logps.dtype)[:, None]
        log_ratio = logps - old
        if a.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(log_ratio)
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - a.epsilon, 1 + self.eps_high) * adv)
        if a.loss_type == "grpo":
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif a.loss_type == "dr_grpo":
            loss = (per_token * mask).sum() / (per_token.shape[0] * a.max_completion_length)
        else:  # bnpo, dapo: the micro-batch's token mean
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        self._add_ratio("self_distillation/policy_loss", loss.detach(), 1)
        return loss
