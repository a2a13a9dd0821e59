"""SDFT (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning", arXiv:2601.19897) as TRL 1.16's
experimental SDFTTrainer computes it: on-policy self-distillation (self_distillation.py: the divergences, the teacher
kinds), where the teacher is the model itself shown privileged context (a demonstration) that the student does not
see.

Each row holds a `prompt` and a `privileged_context`. The student samples num_generations completions of the prompt
(of the teacher's prompt with generate_from_teacher); the teacher's prompt is teacher_prompt_template filled with the
prompt (a chat prompt: its last user message's text, the earlier messages kept) and the context. Every completion
token after the first num_loss_tokens_to_skip is distilled; over gradient accumulation the micro-batches' losses are
averaged (TRL's loss_is_scaled_for_ga).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttune.data.prompts import encode_prompt
from fasttune.errors import ConfigError, DataError
from fasttune.train.objectives.self_distillation import (SelfDistillationConfig, SelfDistillationTrainer,
                                                          context_text, rewritten_prompt)

__all__ = ["SDFTTrainer", "SDFTConfig"]

@dataclass
class SDFTConfig(SelfDistillationConfig):
    """SelfDistillationConfig (its defaults are SDFT's: num_generations 8, max_prompt_length 512, disable_dropout
    True, distillation_mode "topk_logits" with distillation_topk 100, distillation_alpha 0.5, teacher_model_kind
    "base") plus TRL 1.16 SDFTConfig's own fields. Raises ConfigError as SelfDistillationConfig, and for
    num_loss_tokens_to_skip < 0, a teacher_prompt_template without both {prompt} and {privileged_context}, reward
    functions, and GRPO's beta or mask_truncated_completions."""

    num_loss_tokens_to_skip: int = 0  # the first completion tokens get no loss
    generate_from_teacher: bool = False  # sample from the teacher's prompt (with the student's weights)
    teacher_prompt_template: str = "{prompt}\n\n{privileged_context}"

    def __post_init__(self):
        super().__post_init__()
        skip = self.num_loss_tokens_to_skip
        if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
            raise ConfigError(f"num_loss_tokens_to_skip={skip!r} is invalid: a whole number >= 0.")
        template = self.teacher_prompt_template
        if not isinstance(template, str) or "{prompt}" not in template or "{privileged_context}" not in template:
            raise ConfigError(f"teacher_prompt_template={template!r} is invalid: it must hold both {{prompt}} and "
                              f"{{privileged_context}} (TRL's default is '{{prompt}}\\n\\n{{privileged_context}}').")
        for name, default in (("beta", 0.0), ("mask_truncated_completions", False), ("reward_funcs", None)):
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r} does not apply to SDFT (it learns from the teacher, "
                                  f"with no reward or KL penalty); leave it out.")


class SDFTTrainer(SelfDistillationTrainer):
    """SDFT on rows with `prompt` and `privileged_context` (module docstring), as TRL 1.16's
    trl.experimental.sdft SDFTTrainer: model, args (SDFTConfig), train_dataset, eval_dataset, processing_class,
    callbacks, optimizers, peft_config. Logs TRL's metrics: self_distillation/distillation_loss and
    sdft/distillation_loss (each micro-batch's mean over its scored tokens), completions/*. Raises ConfigError as
    SelfDistillationTrainer."""

    config_cls = SDFTConfig
    uses_rewards = False
    packing_refusal = "packing does not apply to SDFT (completions are sampled per step); set packing=False."
    metric_name = "sdft"

    def __init__(self, model, args: SDFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, **kwargs):
        super().__init__(model, None, args, train_dataset, eval_dataset, processing_class, tokenizer, **kwargs)
        self._check_teacher()

    # --- data: the teacher's prompt beside the student's ------------------------------------------------------
    def extend_example(self, example: dict, row: dict, where: str, limit: int) -> bool:
        """The row's teacher prompt (module docstring) as `teacher_ids`, cut to max_prompt_length from the left.
        Raises DataError naming the row for a missing privileged_context, a chat prompt that does not end with a
        user message, or a teacher prompt longer than `limit` (unless drop_long, which drops the row)."""
        a = self.args
        context = row.get("privileged_context")
        if context is None:
            raise DataError(f"{where}: field 'privileged_context' is missing or null; SDFT rows need the context "
                            f"the teacher sees (e.g. a demonstration) beside the prompt.")
        text = context_text(context)
        teacher = rewritten_prompt(row.get("prompt"), lambda prompt: a.teacher_prompt_template.format(
            prompt=prompt, privileged_context=text), where, "SDFT")
        _, ids = encode_prompt(teacher, self.tokenizer, where, **(a.chat_template_kwargs or {}))
        if a.max_prompt_length is not None:
            ids = ids[-a.max_prompt_length:]
        if len(ids) > limit:
            if a.drop_long:
                return False
            raise DataError(f"{where}: the teacher's prompt (prompt + privileged_context) is {len(ids)} tokens; with "
                            f"max_completion_length={a.max_completion_length} at most {limit} fit in max_seq_length. "
                            f"Shorten it, set max_prompt_length, raise max_seq_length, or set drop_long=True.")
        example["teacher_ids"] = ids
        return True

    def example_tokens(self, example: dict) -> int:
        """The longer of the student's and the teacher's prompt, plus max_completion_length."""
        return max(len(example["prompt_ids"]), len(example["teacher_ids"])) + self.args.max_completion_length

    # --- sampling ----------------------------------------------------------------------------------------------
    def sample(self, examples: list[dict], seed: int, model=None):
        """GRPO's sampling, from the teacher's prompt with generate_from_teacher (the student's weights, as TRL)."""
        if self.args.generate_from_teacher:
            examples = [{**ex, "prompt_ids": ex["teacher_ids"]} for ex in examples]
        return super().sample(examples, seed, model)

    @property
    def keeps_old_logps(self) -> bool:
        """Reused samples keep the sampling policy's log-probs (for the importance weights), except when they were
        sampled from the teacher's prompt (TRL's)."""
        return super().keeps_old_logps and not self.args.generate_from_teacher

    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """The completions as micro-batches (no rewards), each with the teacher's rows (add_teacher_rows); records
        completions/*."""
        rollout = self.gather_rollout(torch.zeros(len(examples), 0), completion_ids, truncated, across_ranks)
        if rollout.lengths:
            self._record_lengths(rollout)
        batches = self.micro_batches(examples, completion_ids, truncated, torch.zeros(len(examples)), sizes)
        start = 0
        for b in batches:
            n = b["input_ids"].shape[0]
            self.add_teacher_rows(b, [ex["teacher_ids"] for ex in examples[start:start + n]])
            start += n
        return batches

    # --- the loss ----------------------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation loss of the micro-batch over the completion tokens after the first
        num_loss_tokens_to_skip, divided by the step's micro-batches in training."""
        a, mask = self.args, batch["completion_mask"]
        keep = mask.float()
        if a.num_loss_tokens_to_skip:
            keep = keep * (torch.arange(mask.shape[1], device=keep.device) >= a.num_loss_tokens_to_skip)
        loss, _ = self.distillation(batch, keep)
        loss = loss / (int(batch["steps"]) if self.model.training else 1)
        return loss, loss.detach().to(torch.float64) * num_items
