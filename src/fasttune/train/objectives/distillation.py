"""On-policy distillation as TRL 1.16's DistillationTrainer computes it (Agarwal et al. 2024, GKD, with the student's
own samples): for each prompt the student samples a completion (GRPO's sampling: fasttune's generate() from the
weights being trained); the student and a frozen teacher then score the prompt + completion, and the loss is the
per-token divergence between their next-token distributions over the whole vocabulary at every completion token
(kernels/distill_divergence.py: forward KL, reverse KL or generalized JSD by `beta`), summed over the step's completion
tokens and divided by their count (all ranks), so any split into micro-batches gives the same gradient.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from fasttune.constants import MEDIA_KEYS
from fasttune.errors import ConfigError
from fasttune.kernels.distill_divergence import token_divergence
from fasttune.train.fsdp import is_sharded, shard_model
from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.grpo_config import OnlineRLConfig
from fasttune.train.objectives.reference import scored_hidden

__all__ = ["DistillationTrainer", "DistillationConfig"]


@dataclass
class DistillationConfig(OnlineRLConfig):
    """OnlineRLConfig's sampling fields (temperature, top_p, top_k, min_p, repetition_penalty, generation_kwargs,
    chat_template_kwargs, max_completion_length, log_completions, ...) plus TRL's DistillationConfig fields. `beta`
    here selects the divergence (0: forward KL(teacher || student), 1: reverse KL, TRL's default; between: the
    generalized JSD), not a KL penalty. `temperature` divides both models' logits in the loss as in sampling.
    Raises ConfigError for beta outside [0, 1], reward functions, cast_lm_head_to_fp32, or what OnlineRLConfig
    refuses."""

    min_generations = 1  # (not a field) one sampled completion per prompt, as TRL; more are accepted
    num_generations: int = 1
    max_completion_length: int = 512
    beta: float = 1.0
    teacher_model_name_or_path: str | None = None  # loaded with FastLanguageModel.from_pretrained when the trainer
    # gets no teacher_model
    teacher_model_init_kwargs: dict | None = None  # its from_pretrained keywords, e.g. {"load_in_4bit": true}

    def __post_init__(self):
        if isinstance(self.teacher_model_init_kwargs, str):  # a CLI flag's JSON
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as e:
                raise ConfigError(f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not valid JSON "
                                  f"({e}); give an object, e.g. '{{\"load_in_4bit\": true}}'.") from None
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta} is invalid: in distillation it selects the divergence, in [0, 1] "
                              f"(0: forward KL, 1: reverse KL, TRL's default; between: the generalized JSD).")
        if self.reward_funcs is not None or self.reward_weights is not None:
            raise ConfigError("reward_funcs / reward_weights do not apply to distillation (the teacher's "
                              "distribution is the target); leave them unset, or use GRPOConfig.")
        if self.cast_lm_head_to_fp32:
            raise ConfigError("cast_lm_head_to_fp32=True is not implemented for distillation; leave it False.")
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ConfigError(f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is invalid: give a dict "
                              f"of FastLanguageModel.from_pretrained keywords (or None).")


class DistillationTrainer(GRPOTrainer):
    """On-policy distillation of `teacher_model` into `model`, on rows with a `prompt` (a string or chat messages),
    as TRL 1.16's DistillationTrainer: same arguments (model, teacher_model, args, train_dataset, eval_dataset,
    processing_class, callbacks, optimizers, peft_config). The teacher is a fasttune model (or a path, also
    args.teacher_model_name_or_path, loaded with FastLanguageModel.from_pretrained and
    args.teacher_model_init_kwargs, e.g. load_in_4bit) with the student's vocabulary (its head may have extra rows,
    left out as TRL does); it is frozen and runs without gradients. Logs TRL's metrics: entropy (the student's mean
    over completion tokens) and completions/*. An eval_dataset is sampled and scored as in training.

    On a vision-language model (FastVisionModel, its processor as processing_class) prompts may hold images as for
    GRPOTrainer; the teacher is then a vision-language model of the same family (a path loads with
    FastVisionModel), and both score each completion with its prompt's images.

    Raises ConfigError for args that are not a DistillationConfig, no teacher, a teacher on the transformers fallback
    or on another device, a teacher vocabulary smaller than the student's, the student itself as teacher, a teacher
    of another kind (text / vision-language family) than the student, an LM head kept in host memory
    (offload_lm_head); and as GRPOTrainer for the sampling settings and data."""

    config_cls = DistillationConfig
    takes_tools = False  # (TRL's trainer of this name samples in one turn)
    uses_rewards = False
    packing_refusal = "packing does not apply to distillation (completions are sampled per step); set packing=False."

    def __init__(self, model, teacher_model=None, args: DistillationConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, tokenizer=None, **kwargs):
        super().__init__(model, None, args, train_dataset, eval_dataset, processing_class, tokenizer, **kwargs)
        self.teacher = self._teacher(teacher_model)

    @property
    def uses_reference(self) -> bool:
        """No reference policy: `beta` selects the divergence to the teacher."""
        return False

    def _teacher(self, teacher):
        from fasttune.api import FastLanguageModel, FastVisionModel
        from fasttune.models.causal_lm import CausalLM
        from fasttune.models.host_head import host_head

        a, model = self.args, self.model
        # (from_pretrained(fsdp=True): the student waits in host memory, or on the meta device after rank 0, for
        # the GPU FSDP moves it to; under FSDP a teacher read from a folder is loaded the same way, and sharded with
        # the student when training starts: shard_companions)
        device = getattr(model, "fsdp_device", None) or model.device
        teacher = teacher if teacher is not None else a.teacher_model_name_or_path
        if teacher is None:
            raise ConfigError("DistillationTrainer needs a teacher: teacher_model=<a model or its folder>, or "
                              "DistillationConfig(teacher_model_name_or_path=...).")
        if isinstance(teacher, (str, os.PathLike)):
            kw = {"dtype": model.dtype, "device": device, **({"fsdp": True} if a.fsdp else {}),
                  **(a.teacher_model_init_kwargs or {})}
            teacher, _ = (FastVisionModel if self.vision else FastLanguageModel).from_pretrained(str(teacher), **kw)
        if teacher is model:
            raise ConfigError("The teacher is the student itself; give a separate (usually larger) teacher model.")
        if not isinstance(model, CausalLM) or not isinstance(teacher, CausalLM):
            raise ConfigError("DistillationTrainer needs the student and the teacher on fasttune's decoder "
                              "(FastLanguageModel.from_pretrained with fast=True); one of them runs on the "
                              "transformers fallback.")
        kinds = [getattr(getattr(m, "family", None), "model_type", None) for m in (model, teacher)]
        if kinds[0] != kinds[1]:
            student, teacher_kind = (f"a {k} vision-language model" if k else "a text model" for k in kinds)
            raise ConfigError(f"The student is {student} and the teacher {teacher_kind}: both read the same prompts "
                              f"(and images), so distil between models of one kind (text, or one vision family).")
        if host_head(model) is not None or host_head(teacher) is not None:
            raise ConfigError("DistillationTrainer does not implement offload_lm_head=True (the divergence reads both "
                              "heads on the GPU); load the student and the teacher without it.")
        if teacher.lm_head.weight.shape[0] < model.lm_head.weight.shape[0]:
            raise ConfigError(f"The teacher's vocabulary ({teacher.lm_head.weight.shape[0]} tokens) is smaller than "
                              f"the student's ({model.lm_head.weight.shape[0]}): distillation compares their "
                              f"distributions token by token, so they need the same tokenizer.")
        if getattr(teacher, "fsdp_device", teacher.device) != device:  # (a staged teacher: the GPU it will use)
            raise ConfigError(f"The teacher is on {teacher.device} and the student on {device}; load both on the "
                              f"same device.")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def shard_companions(self) -> None:
        """Under FSDP the teacher is sharded like the student (each decoder layer, then the root; train/fsdp.py's
        shard_model), as TRL's trainers prepare it with accelerate: each GPU holds its share of the teacher and
        gathers a layer's weights just before the layer runs. Its passes then run in lockstep on every rank (the
        micro-batches, and filler_loss in a short step); its root (embeddings, final norm, LM head) stays gathered
        after a pass (FSDP's rule for the root, which the divergence reads) until the optimizer step (_after_step)."""
        if not is_sharded(self.teacher):
            shard_model(self.teacher)

    def _after_step(self, run):
        """Under FSDP the sharded teacher's root (embeddings, final norm, LM head), gathered by its passes and kept so
        by FSDP's rule for a root, is freed after each optimizer step (no collective): the next step's rollouts, which
        gather the student whole, run without it, and its next pass gathers it again."""
        if is_sharded(self.teacher):
            self.teacher.reshard()
        super()._after_step(run)

    def evaluation_companions(self) -> tuple:
        """The teacher: an evaluation's ranks run different numbers of batches."""
        return (self.teacher,)

    def filler_loss(self, num_items: int) -> torch.Tensor:
        """GRPO's zero-weight pass (a rank without a micro-batch in a short step under FSDP), then the sharded
        teacher's pass over the same prompt, as a busy rank's micro_batch_loss runs the student's and then the
        teacher's (their layers' gathers meet in that order)."""
        loss = super().filler_loss(num_items)
        if is_sharded(self.teacher):
            ids, mask, media = self.filler_inputs()
            last = torch.ones((1, 1), dtype=torch.bool, device=ids.device)
            with torch.no_grad():
                scored_hidden(self.teacher, ids, mask, last, None, None, media or None)
        return loss

    # --- sampling: no rewards, one completion per prompt ----------------------------------------------------------
    def score(self, examples: list[dict], completion_ids: list[list[int]], truncated: list[bool],
              sizes: list[int], group: int | None = None, across_ranks: bool = False) -> list[dict]:
        """The sampled completions as micro-batches (no rewards, no advantages); records TRL's completions/*
        metrics (over every rank's completions when across_ranks) and, with log_completions, the step's table."""
        rollout = self.gather_rollout(torch.zeros(len(examples), 0), completion_ids, truncated, across_ranks)
        if rollout.lengths:
            self._record_lengths(rollout)
        if self._completions is not None:
            texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if completion_ids else []
            prompts = [ex["prompt"] for ex in examples]
            chat = bool(prompts) and not isinstance(prompts[0], str)
            self._scored = (prompts, [[{"role": "assistant", "content": t}] for t in texts] if chat else texts)
            self.keep_completions(rollout, None, across_ranks)
        return self.micro_batches(examples, completion_ids, truncated, torch.zeros(len(examples)), sizes)

    # --- the loss ----------------------------------------------------------------------------------------------
    @property
    def loss_temperature(self) -> float:
        """What divides both models' logits in the divergence: the sampling temperature, as TRL's
        DistillationTrainer (GKD's trainer: 1)."""
        return self.args.temperature

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The divergence summed over this micro-batch's completion tokens / num_items (the step's completion
        tokens, all ranks); records the student's entropy."""
        a = self.args
        mask = batch["completion_mask"].bool()
        ids, att = batch["input_ids"], batch["attention_mask"]
        media = {k: batch[k] for k in MEDIA_KEYS if k in batch} or None
        args = (ids, att, mask, batch.get("completion_positions"), self.sampling_positions(att, media), media)
        student = scored_hidden(self.model, *args)
        with torch.no_grad():
            teacher = scored_hidden(self.teacher, *args)
        div, entropy = token_divergence(
            self.model.head_input(student), self.model.lm_head.weight, self.teacher.head_input(teacher),
            self.teacher.lm_head.weight, a.beta, self.loss_temperature, self.model.arch.final_logit_softcap,
            self.teacher.arch.final_logit_softcap)
        loss = div.sum() / max(num_items, 1)
        self._add_ratio("entropy", entropy.sum(), entropy.numel())
        return loss, loss.detach().to(torch.float64) * num_items
