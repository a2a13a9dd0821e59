"""SDFT (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning", arXiv:2601.19897) as TRL 1.16's
experimental SDFTTrainer computes it, on GRPO's sampling (grpo.py): on-policy self-distillation, where the teacher
is the model itself shown privileged context (a demonstration) that the student does not see.

Each row holds a `prompt` and a `privileged_context`. The student samples num_generations completions of the prompt
(of the teacher's prompt with generate_from_teacher); the teacher's prompt is teacher_prompt_template filled with the
prompt (a chat prompt: its last user message's text, the earlier messages kept) and the context. Both models score
the same completions, logits divided by the sampling temperature, and each completion token (after the first
num_loss_tokens_to_skip) gets the divergence between their next-token distributions (kernels/distill_divergence.py,
distillation_alpha: 0 forward KL(teacher || student), 1 reverse KL, between the generalized JSD):
- "topk_logits" (default): on the student's distillation_topk most likely tokens, renormalised over them or with a
  tail entry for the rest (distillation_add_tail);
- "full_logits": over the whole vocabulary;
- "sampled_token" (distillation_alpha 1 only): (log p_s - log p_t) x log p_s of the sampled token, the first factor
  without gradient.
A completion's loss is the mean over its scored tokens; the micro-batch's the mean over completions; over gradient
accumulation the micro-batches' mean (TRL's loss_is_scaled_for_ga). When the completions were sampled by an earlier
policy (num_iterations > 1, or a generation batch over several steps) each token's term is weighted by the
importance ratio p_s / p_sampled (no gradient), capped at distillation_is_clip.

The teacher (teacher_model_kind): "base", the model with its LoRA adapters off (TRL's, for a PEFT model); "live",
the model as it is now (no gradient); "ema", a second copy of the LoRA weights, zeros at the start, moved after every
teacher_sync_steps-th optimizer step to (1 - teacher_update_rate) x itself + teacher_update_rate x the student's
(TRL's PEFT adapter EMA, LoRA A and B averaged separately), and started again at zeros when a run resumes (TRL keeps
no EMA state in its checkpoints either).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fasttune.data.prompts import encode_prompt
from fasttune.errors import ConfigError, DataError
from fasttune.kernels.distill_divergence import token_divergence, topk_token_divergence
from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import OnlineRLConfig
from fasttune.train.objectives.reference import ReferencePolicy, adapters_disabled, scored_hidden

__all__ = ["SDFTTrainer", "SDFTConfig"]

MODES = ("topk_logits", "full_logits", "sampled_token")
TEACHERS = ("base", "live", "ema")


@dataclass
class SDFTConfig(OnlineRLConfig):
    """OnlineRLConfig's sampling fields plus TRL 1.16 SDFTConfig's (its defaults: num_generations 8,
    max_prompt_length 512, disable_dropout True, the fields below). Raises ConfigError for a distillation_mode outside
    MODES, distillation_alpha outside [0, 1] (or not 1 with "sampled_token"), distillation_topk < 1,
    distillation_is_clip <= 0, num_loss_tokens_to_skip < 0, a teacher_model_kind outside TEACHERS,
    teacher_update_rate outside (0, 1], teacher_sync_steps < 1, a teacher_prompt_template without both {prompt} and
    {privileged_context}, reward functions, and GRPO's beta or mask_truncated_completions."""

    min_generations = 1  # (a class setting: self-distillation compares no completions within a group)
    max_prompt_length: int | None = 512
    disable_dropout: bool = True
    distillation_alpha: float = 0.5
    distillation_mode: str = "topk_logits"
    distillation_topk: int = 100
    distillation_is_clip: float | None = 2.0  # cap on the importance ratio of reused samples; None: no weighting
    distillation_add_tail: bool = False
    num_loss_tokens_to_skip: int = 0  # the first completion tokens get no loss
    teacher_model_kind: str = "base"
    teacher_update_rate: float = 0.05
    teacher_sync_steps: int = 1
    generate_from_teacher: bool = False  # sample from the teacher's prompt (with the student's weights)
    teacher_prompt_template: str = "{prompt}\n\n{privileged_context}"

    def __post_init__(self):
        super().__post_init__()
        if self.distillation_mode not in MODES:
            raise ConfigError(f"distillation_mode={self.distillation_mode!r} is not supported; use one of {MODES}.")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ConfigError(f"distillation_alpha={self.distillation_alpha} is invalid: 0 (forward KL) to 1 (reverse "
                              f"KL); between, the generalized JSD.")
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ConfigError(f"distillation_mode='sampled_token' is the reverse KL on the sampled token, so it needs "
                              f"distillation_alpha=1.0 (got {self.distillation_alpha}), as TRL requires.")
        for name, low in (("distillation_topk", 1), ("teacher_sync_steps", 1), ("num_loss_tokens_to_skip", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} is invalid: a whole number >= {low}.")
        if self.distillation_is_clip is not None and not self.distillation_is_clip > 0:
            raise ConfigError(f"distillation_is_clip={self.distillation_is_clip} is invalid: the importance ratio's "
                              f"cap must be > 0 (TRL's default is 2.0), or None for no weighting.")
        if self.teacher_model_kind not in TEACHERS:
            raise ConfigError(f"teacher_model_kind={self.teacher_model_kind!r} is not supported; use one of "
                              f"{TEACHERS} (the base model, the live student, or an EMA of its adapter).")
        if not 0.0 < self.teacher_update_rate <= 1.0:
            raise ConfigError(f"teacher_update_rate={self.teacher_update_rate} is invalid: in (0, 1].")
        template = self.teacher_prompt_template
        if not isinstance(template, str) or "{prompt}" not in template or "{privileged_context}" not in template:
            raise ConfigError(f"teacher_prompt_template={template!r} is invalid: it must hold both {{prompt}} and "
                              f"{{privileged_context}} (TRL's default is '{{prompt}}\\n\\n{{privileged_context}}').")
        for name, default in (("beta", 0.0), ("mask_truncated_completions", False), ("reward_funcs", None)):
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r} does not apply to SDFT (it learns from the teacher, "
                                  f"with no reward or KL penalty); leave it out.")


def _context_text(value) -> str:
    """TRL's rendering of a privileged context: a string as it is, chat messages' text contents joined by
    newlines, anything else str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        parts = []
        for message in value:
            content = message.get("content", "")
            text = " ".join(p.get("text", "") for p in content if p.get("type") == "text") \
                if isinstance(content, list) else str(content)
            if text:
                parts.append(text)
        return "\n".join(parts)
    return str(value)


class SDFTTrainer(GRPOTrainer):
    """SDFT on rows with `prompt` and `privileged_context` (module docstring), as TRL 1.16's
    trl.experimental.sdft SDFTTrainer: model, args (SDFTConfig), train_dataset, eval_dataset, processing_class,
    callbacks, optimizers, peft_config. Logs TRL's metrics: self_distillation/distillation_loss and
    sdft/distillation_loss (each micro-batch's mean over its scored tokens), completions/*. Raises ConfigError as
    GRPOTrainer, for a vision-language model (TRL's SDFT reads text prompts), for teacher_model_kind "base" or
    "ema" without LoRA adapters (fasttune keeps no second copy of the whole model; "live" trains any model), with
    modules_to_save ("base": PEFT's base has the saved modules' original weights, which fasttune does not keep;
    "ema": TRL's EMA covers LoRA weights only), and for distillation_topk above the vocabulary."""

    config_cls = SDFTConfig
    uses_rewards = False
    packing_refusal = "packing does not apply to SDFT (completions are sampled per step); set packing=False."
    metric_name = "sdft"

    @property
    def uses_reference(self) -> bool:
        """No reference policy: the teacher (teacher_model_kind) takes its place."""
        return False

    def __init__(self, model, args: SDFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, **kwargs):
        super().__init__(model, None, args, train_dataset, eval_dataset, processing_class, tokenizer, **kwargs)
        a, name = self.args, type(self).__name__
        if self.vision:
            raise ConfigError(f"{name} reads text prompts only (as TRL's); load a language model.")
        kind = a.teacher_model_kind
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if kind != "live" and self.model.lora_settings is None:
            raise ConfigError(f"teacher_model_kind='{kind}' needs LoRA adapters (its teacher is the model with them "
                              f"off, or an average of them); fasttune keeps no second copy of the whole model. Add "
                              f"LoRA with FastLanguageModel.get_peft_model, or use teacher_model_kind='live'.")
        if kind != "live" and any("lora_" not in n for n in trainable):
            raise ConfigError(f"teacher_model_kind='{kind}' with modules_to_save is not supported (the saved modules "
                              f"train in place, so their starting weights are gone); train LoRA adapters only, or "
                              f"use teacher_model_kind='live'.")
        from fasttune.models.causal_lm import CausalLM
        from fasttune.models.host_head import host_head

        if not isinstance(self.model, CausalLM):
            raise ConfigError(f"{name} needs a model on fasttune's decoder (FastLanguageModel.from_pretrained with "
                              f"fast=True); this one runs on the transformers fallback.")
        if host_head(self.model) is not None:
            raise ConfigError(f"{name} does not implement offload_lm_head=True (the divergence reads the head on the "
                              f"GPU); load the model without it.")
        if a.distillation_mode == "topk_logits" and a.distillation_topk > self.model.lm_head.weight.shape[0]:
            raise ConfigError(f"distillation_topk={a.distillation_topk} is more than the vocabulary "
                              f"({self.model.lm_head.weight.shape[0]} tokens); lower it.")
        self.ema = None
        if kind == "ema":
            self.ema = ReferencePolicy.from_weights(
                self.model, {n: torch.zeros_like(p) for n, p in self.model.named_parameters() if p.requires_grad})

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
        prompt, text = row.get("prompt"), _context_text(context)
        if isinstance(prompt, list):
            last = prompt[-1] if prompt else {}
            if not isinstance(last, dict) or last.get("role") != "user":
                raise DataError(f"{where}: the prompt's last message is not the user's; SDFT writes the privileged "
                                f"context into the last user message, so end the prompt with a user turn.")
            content = last.get("content", "")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            teacher = prompt[:-1] + [{"role": "user", "content": a.teacher_prompt_template.format(
                prompt=content, privileged_context=text)}]
        else:
            teacher = a.teacher_prompt_template.format(prompt=prompt, privileged_context=text)
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
        """The completions as micro-batches (no rewards), each with the teacher's rows (teacher_input_ids,
        teacher_attention_mask: the teacher's prompt, left-padded, then the same completions); records
        completions/*."""
        rollout = self.gather_rollout(torch.zeros(len(examples), 0), completion_ids, truncated, across_ranks)
        if rollout.lengths:
            self._record_lengths(rollout)
        batches = self.micro_batches(examples, completion_ids, truncated, torch.zeros(len(examples)), sizes)
        start = 0
        for b in batches:
            n = b["input_ids"].shape[0]
            teacher = [ex["teacher_ids"] for ex in examples[start:start + n]]
            width = max(map(len, teacher))
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for r, t in enumerate(teacher):
                ids[r, width - len(t):], mask[r, width - len(t):] = torch.tensor(t), 1
            comp = b["completion_mask"].shape[1]
            b["teacher_input_ids"] = torch.cat([ids, b["input_ids"][:, -comp:]], dim=1)
            b["teacher_attention_mask"] = torch.cat([mask, b["completion_mask"]], dim=1)
            start += n
        return batches

    # --- the loss ----------------------------------------------------------------------------------------------
    @contextmanager
    def teacher(self):
        """Within this context the model computes the teacher (teacher_model_kind)."""
        kind = self.args.teacher_model_kind
        if kind == "base":
            with adapters_disabled(self.model):
                yield
        elif kind == "ema":
            with self.ema.active():
                yield
        else:
            yield

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-distillation loss of the micro-batch (module docstring), divided by the step's micro-batches in
        training; records the mean per-token term."""
        a, model = self.args, self.model
        mask = batch["completion_mask"]
        scored = mask.bool()
        positions = batch.get("completion_positions")
        t_ids, t_att = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        # the teacher first: its weights may be swapped in place (ema), never between the student's forward and
        # backward
        with torch.no_grad(), self.teacher():
            teacher = scored_hidden(model, t_ids, t_att, scored, positions, self.sampling_positions(t_att, None))
        ids, att = batch["input_ids"], batch["attention_mask"]
        student = scored_hidden(model, ids, att, scored, positions, self.sampling_positions(att, None))
        head, softcap = model.lm_head.weight, model.arch.final_logit_softcap
        hs, ht = model.head_input(student), model.head_input(teacher)
        targets = ids[:, -mask.shape[1]:][scored]
        student_logps = None
        if a.distillation_mode == "topk_logits":
            terms = topk_token_divergence(hs, head, ht, head, a.distillation_topk, a.distillation_alpha,
                                          a.distillation_add_tail, a.temperature, softcap, softcap)
        elif a.distillation_mode == "full_logits":
            terms = token_divergence(hs, head, ht, head, a.distillation_alpha, a.temperature, softcap, softcap)[0]
        else:
            student_logps = model.token_logprobs(student, targets, a.temperature)
            with torch.no_grad():
                teacher_logps = model.token_logprobs(teacher, targets, a.temperature)
            terms = (student_logps - teacher_logps).detach() * student_logps
        old = batch.get("old_logps")
        if old is not None and a.distillation_is_clip is not None:
            if student_logps is None:
                with torch.no_grad():
                    student_logps = model.token_logprobs(student, targets, a.temperature)
            drift = (student_logps.detach() - old[scored]).clamp(-20.0, 20.0)
            terms = terms * drift.exp().clamp(max=a.distillation_is_clip)
        per_token = torch.zeros(mask.shape, dtype=terms.dtype, device=terms.device).masked_scatter(scored, terms)
        keep = mask.to(terms.dtype)
        if a.num_loss_tokens_to_skip:
            keep = keep * (torch.arange(mask.shape[1], device=keep.device) >= a.num_loss_tokens_to_skip)
        per_completion = (per_token * keep).sum(-1) / keep.sum(-1).clamp(min=1.0)
        steps = int(batch["steps"]) if model.training else 1
        loss = per_completion.mean() / steps
        with torch.no_grad():
            s, n = (per_token.detach() * keep).sum(), keep.sum()
            self._add_ratio("self_distillation/distillation_loss", s, n)
            self._add_ratio(f"{self.metric_name}/distillation_loss", s, n)
        return loss, loss.detach().to(torch.float64) * num_items

    def _after_step(self, run):
        """The EMA teacher moves after every teacher_sync_steps-th optimizer step (TRL's on_step_end), before the
        step's log, evaluation and checkpoint."""
        a = self.args
        if self.ema is not None and run.step % a.teacher_sync_steps == 0:
            self.ema.blend(a.teacher_update_rate)
        super()._after_step(run)
