"""What TRL 1.16's self-distillation trainers (SDFT: sdft.py, SDPO: sdpo.py) share, on GRPO's sampling (grpo.py):
the model shown more context (a demonstration, a successful sibling completion, feedback) is the teacher of the same
model without it, on the student's own samples.

Both models score the same completions, logits divided by the sampling temperature, and each completion token gets
the divergence between their next-token distributions (kernels/distill_divergence.py, distillation_alpha: 0 forward
KL(teacher || student), 1 reverse KL, between the generalized JSD):
- "topk_logits": on the student's distillation_topk likeliest tokens, renormalised over them or with a tail entry for
  the rest (distillation_add_tail);
- "full_logits": over the whole vocabulary;
- "sampled_token" (distillation_alpha 1 only): (log p_s - log p_t) x log p_s of the sampled token, the first factor
  without gradient.
When the completions were sampled by an earlier policy (num_iterations > 1, or a generation batch over several steps)
each token's term is weighted by the importance ratio p_s / p_sampled (no gradient), capped at distillation_is_clip.
A completion's distillation loss is the mean over its scored tokens, a micro-batch's the mean over completions.

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

from fasttune.errors import ConfigError, DataError
from fasttune.kernels.distill_divergence import token_divergence, topk_token_divergence
from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import OnlineRLConfig
from fasttune.train.objectives.reference import ReferencePolicy, adapters_disabled, scored_hidden

MODES = ("topk_logits", "full_logits", "sampled_token")
TEACHERS = ("base", "live", "ema")


@dataclass
class SelfDistillationConfig(OnlineRLConfig):
    """The fields SDFTConfig and SDPOConfig share (TRL's names; SDFT's defaults). Raises ConfigError for a
    distillation_mode outside MODES, distillation_alpha outside [0, 1] (or not 1 with "sampled_token"),
    distillation_topk < 1 (or None with "topk_logits"), distillation_is_clip <= 0, a teacher_model_kind outside
    TEACHERS, teacher_update_rate outside (0, 1], teacher_sync_steps < 1."""

    min_generations = 1  # (a class setting: any number of completions per prompt)
    max_prompt_length: int | None = 512
    disable_dropout: bool = True
    distillation_alpha: float = 0.5
    distillation_mode: str = "topk_logits"
    distillation_topk: int | None = 100
    distillation_is_clip: float | None = 2.0  # cap on the importance ratio of reused samples; None: no weighting
    distillation_add_tail: bool = False
    teacher_model_kind: str = "base"
    teacher_update_rate: float = 0.05
    teacher_sync_steps: int = 1

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
        if self.distillation_mode == "topk_logits" and self.distillation_topk is None:
            raise ConfigError("distillation_mode='topk_logits' needs distillation_topk (the tokens it compares, e.g. "
                              "100), as TRL requires.")
        for name, low in (("distillation_topk", 1), ("teacher_sync_steps", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"{name}={value!r} is invalid: a whole number >= {low}.")
        if self.distillation_is_clip is not None and not self.distillation_is_clip > 0:
            raise ConfigError(f"distillation_is_clip={self.distillation_is_clip} is invalid: the importance ratio's "
                              f"cap must be > 0 (TRL's default is 2.0), or None for no weighting.")
        if self.teacher_model_kind not in TEACHERS:
            raise ConfigError(f"teacher_model_kind={self.teacher_model_kind!r} is not supported; use one of "
                              f"{TEACHERS} (the base model, the live student, or an EMA of its adapter).")
        if not 0.0 < self.teacher_update_rate <= 1.0:
            raise ConfigError(f"teacher_update_rate={self.teacher_update_rate} is invalid: in (0, 1].")


def context_text(value) -> str:
    """TRL's rendering of a privileged context or feedback: a string as it is, chat messages' text contents joined
    by newlines, anything else str()."""
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


def rewritten_prompt(prompt, fill, where: str, method: str):
    """The teacher's prompt: fill(text) of a string prompt; for chat messages, the earlier messages kept and the last
    user message's text (its text parts joined) replaced by fill(text), as TRL's self-distillation trainers write it.
    Raises DataError naming `where` when a chat prompt does not end with the user's message."""
    if not isinstance(prompt, list):
        return fill(prompt)
    last = prompt[-1] if prompt else {}
    if not isinstance(last, dict) or last.get("role") != "user":
        raise DataError(f"{where}: the prompt's last message is not the user's; {method} writes the teacher's context "
                        f"into the last user message, so end the prompt with a user turn.")
    content = last.get("content", "")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return prompt[:-1] + [{"role": "user", "content": fill(content)}]


class SelfDistillationTrainer(GRPOTrainer):
    """The shared part of SDFTTrainer and SDPOTrainer (module docstring). Raises ConfigError as GRPOTrainer, for a
    vision-language model (TRL's trainers read text prompts), a model on the transformers fallback or with
    offload_lm_head, teacher_model_kind "base" or "ema" without LoRA adapters (fasttune keeps no second copy of the
    whole model; "live" trains any model) or with modules_to_save ("base": PEFT's base has the saved modules'
    original weights, which fasttune does not keep; "ema": TRL's EMA covers LoRA weights only), and for
    distillation_topk above the vocabulary."""

    metric_name = "self_distillation"  # TRL's second name of the distillation-loss metric: the trainer's
    takes_tools = False  # (TRL's SDFT / SDPO sample in one turn)

    @property
    def uses_reference(self) -> bool:
        """No reference policy: the teacher (teacher_model_kind) takes its place."""
        return False

    def _check_teacher(self):
        """The refusals of the class docstring; sets up the EMA copy for teacher_model_kind="ema"."""
        from fasttune.models.causal_lm import CausalLM
        from fasttune.models.host_head import host_head

        a, name, model = self.args, type(self).__name__, self.model
        if self.vision:
            raise ConfigError(f"{name} reads text prompts only (as TRL's); load a language model.")
        if not isinstance(model, CausalLM):
            raise ConfigError(f"{name} needs a model on fasttune's decoder (FastLanguageModel.from_pretrained with "
                              f"fast=True); this one runs on the transformers fallback.")
        if host_head(model) is not None:
            raise ConfigError(f"{name} does not implement offload_lm_head=True (the divergence reads the head on the "
                              f"GPU); load the model without it.")
        kind = a.teacher_model_kind
        if kind != "live" and model.lora_settings is None:
            raise ConfigError(f"teacher_model_kind='{kind}' needs LoRA adapters (its teacher is the model with them "
                              f"off, or an average of them); fasttune keeps no second copy of the whole model. Add "
                              f"LoRA with FastLanguageModel.get_peft_model, or use teacher_model_kind='live'.")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if kind != "live" and any("lora_" not in n for n in trainable):
            raise ConfigError(f"teacher_model_kind='{kind}' with modules_to_save is not supported (the saved modules "
                              f"train in place, so their starting weights are gone); train LoRA adapters only, or "
                              f"use teacher_model_kind='live'.")
        vocab = model.lm_head.weight.shape[0]
        if a.distillation_mode == "topk_logits" and a.distillation_topk > vocab:
            raise ConfigError(f"distillation_topk={a.distillation_topk} is more than the vocabulary ({vocab} tokens); "
                              f"lower it.")
        self.ema = ReferencePolicy.from_weights(model, {n: torch.zeros_like(p) for n, p in trainable.items()}) \
            if kind == "ema" else None

    # --- the teacher -------------------------------------------------------------------------------------------
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

    def filler_loss(self, num_items: int) -> torch.Tensor:
        """GRPO's zero-weight pass (a rank without a micro-batch in a short step under FSDP), with the teacher's pass
        first, as a busy rank's micro_batch_loss runs it: the same model in the teacher's context (the EMA weights
        swapped in frees the gathered root, so its next forward gathers it again); SDPO with distillation_weight 0
        runs the student's pass alone."""
        if getattr(self.args, "distillation_weight", 1.0) != 0.0:
            with torch.no_grad(), self.teacher():
                super().filler_loss(num_items)
        return super().filler_loss(num_items)

    def add_teacher_rows(self, batch: dict, teacher_prompts: list[list[int]]):
        """batch["teacher_input_ids"] / ["teacher_attention_mask"] (B, P + n): each row's teacher prompt token ids,
        left-padded, then the batch's completions with their mask."""
        n, width = len(teacher_prompts), max(map(len, teacher_prompts))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, t in enumerate(teacher_prompts):
            ids[r, width - len(t):], mask[r, width - len(t):] = torch.tensor(t, dtype=torch.long), 1
        comp = batch["completion_mask"]
        batch["teacher_input_ids"] = torch.cat([ids, batch["input_ids"][:, -comp.shape[1]:]], dim=1)
        batch["teacher_attention_mask"] = torch.cat([mask, comp], dim=1)

    def _after_step(self, run):
        """The EMA teacher moves after every teacher_sync_steps-th optimizer step (TRL's on_step_end), before the
        step's log, evaluation and checkpoint."""
        a = self.args
        if self.ema is not None and run.step % a.teacher_sync_steps == 0:
            self.ema.blend(a.teacher_update_rate)
        super()._after_step(run)

    # --- the loss ----------------------------------------------------------------------------------------------
    def distillation(self, batch: dict, keep: torch.Tensor, with_logps: bool = False):
        """The distillation loss of the micro-batch (module docstring): the mean over completions of each one's mean
        term over its `keep` (B, n) tokens (a float mask within the completion mask); records the micro-batch's
        mean term under self_distillation/distillation_loss and <metric_name>/distillation_loss. Returns (loss, ()
        differentiable; the student's log-probs of the completion tokens (N,) fp32, differentiable, when with_logps,
        else None)."""
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
        logps = model.token_logprobs(student, targets, a.temperature) \
            if with_logps or a.distillation_mode == "sampled_token" else None
        if a.distillation_mode == "topk_logits":
            terms = topk_token_divergence(hs, head, ht, head, a.distillation_topk, a.distillation_alpha,
                                          a.distillation_add_tail, a.temperature, softcap, softcap)
        elif a.distillation_mode == "full_logits":
            terms = token_divergence(hs, head, ht, head, a.distillation_alpha, a.temperature, softcap, softcap)[0]
        else:
            with torch.no_grad():
                teacher_logps = model.token_logprobs(teacher, targets, a.temperature)
            terms = (logps - teacher_logps).detach() * logps
        old = batch.get("old_logps")
        if old is not None and a.distillation_is_clip is not None:
            student_logps = logps if logps is not None else model.token_logprobs(student.detach(), targets,
                                                                                 a.temperature)
            drift = (student_logps.detach() - old[scored]).clamp(-20.0, 20.0)
            terms = terms * drift.exp().clamp(max=a.distillation_is_clip)
        per_token = torch.zeros(mask.shape, dtype=terms.dtype, device=terms.device).masked_scatter(scored, terms)
        keep = keep.to(terms.dtype)
        loss = ((per_token * keep).sum(-1) / keep.sum(-1).clamp(min=1.0)).mean()
        with torch.no_grad():
            s, n = (per_token.detach() * keep).sum(), keep.sum()
            self._add_ratio("self_distillation/distillation_loss", s, n)
            self._add_ratio(f"{self.metric_name}/distillation_loss", s, n)
        return loss, logps
