"""IW-OPD (Xie et al. 2026, "On the Position Bias of On-Policy Distillation", arXiv:2606.22600) as TRL 1.16's
experimental IWOPDTrainer computes it, on GKD's data and sampling (gkd.py): the student samples a completion of
each conversation's prompt and learns from the teacher's log-probs of its own tokens, each token's signal weighted
down by how far teacher and student have already drifted apart before it.

Per sampled token t of a completion, with log-probs at `temperature` (the teacher's over its whole vocabulary):
a_t = log p_teacher(y_t) - log p_student(y_t) (no gradient), the weight w_t = 1 + iw_opd_gamma (1 - sum_{s<t} |a_s| /
max(sum_s |a_s|, iw_opd_epsilon)), and the loss -log p_student(y_t) x w_t a_t, summed over the step's completion
tokens and divided by their count (all ranks). TRL divides by the count of the dataset's completion tokens instead
(its loss is inf for prompt-only rows, which have none); with completions of the data's length the two agree.

distillation_objective="jsd" is GKD's generalized JSD over the whole vocabulary (loss_top_k=0; TRL's top-1 support
approximation, loss_top_k=1, is not implemented), with the logits divided by `temperature`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasttune.errors import ConfigError
from fasttune.train.objectives.gkd import GKDConfig, GKDTrainer
from fasttune.train.objectives.grpo import GRPOTrainer
from fasttune.train.objectives.reference import scored_hidden

__all__ = ["IWOPDTrainer", "IWOPDConfig"]


@dataclass
class IWOPDConfig(GKDConfig):
    """GKDConfig with TRL 1.16 IWOPDConfig's fields and defaults: lmbda 1 (every micro-batch on-policy), beta 1,
    temperature 1 (sampling and loss), top_p 0.95, learning_rate 1e-6, max_completion_length 512 (TRL's name; or
    max_new_tokens), max_length 1024 (prompt + completion; max_prompt_length defaults to the difference),
    distillation_objective "iw_opd", iw_opd_gamma 0.5, iw_opd_epsilon 1e-8. Raises ConfigError as GKDConfig, and for
    an objective outside ("iw_opd", "jsd"), "iw_opd" with lmbda < 1 or reverse_kl_top_1_mode other than "sampled"
    (TRL's rules), "jsd" with loss_top_k other than 0, iw_opd_gamma < 0, iw_opd_epsilon <= 0, or
    max_completion_length >= max_length."""

    lmbda: float = 1.0
    beta: float = 1.0
    temperature: float = 1.0
    top_p: float = 0.95
    learning_rate: float = 1e-6
    max_completion_length: int = 512
    max_new_tokens: int | None = None  # GKD's name for max_completion_length; given, it wins
    max_length: int | None = 1024
    distillation_objective: str = "iw_opd"
    iw_opd_gamma: float = 0.5
    iw_opd_epsilon: float = 1e-8
    reverse_kl_top_1_mode: str = "sampled"
    loss_top_k: int = 1
    loss_add_tail: bool = True

    def __post_init__(self):
        if self.max_new_tokens is None:
            self.max_new_tokens = self.max_completion_length
        super().__post_init__()
        if self.distillation_objective not in ("iw_opd", "jsd"):
            raise ConfigError(f"distillation_objective={self.distillation_objective!r} is not supported; use 'iw_opd' "
                              f"or 'jsd'.")
        if self.distillation_objective == "iw_opd":
            if self.lmbda != 1.0:
                raise ConfigError(f"distillation_objective='iw_opd' is on-policy, so it needs lmbda=1.0 (got "
                                  f"{self.lmbda}), as TRL requires.")
            if self.reverse_kl_top_1_mode != "sampled":
                raise ConfigError("distillation_objective='iw_opd' is defined on the sampled tokens, so it needs "
                                  "reverse_kl_top_1_mode='sampled', as TRL requires.")
        elif self.loss_top_k != 0:
            raise ConfigError(f"distillation_objective='jsd' with loss_top_k={self.loss_top_k} (TRL's sparse top-k "
                              f"approximation) is not implemented; set loss_top_k=0 for the exact JSD over the whole "
                              f"vocabulary (or use GKDTrainer).")
        if self.iw_opd_gamma < 0 or not self.iw_opd_epsilon > 0:
            raise ConfigError(f"iw_opd_gamma={self.iw_opd_gamma} must be >= 0 and iw_opd_epsilon="
                              f"{self.iw_opd_epsilon} > 0.")
        if self.max_length is not None:
            if self.max_completion_length >= self.max_length:
                raise ConfigError(f"max_completion_length={self.max_completion_length} must be below max_length="
                                  f"{self.max_length}, to leave room for the prompt.")
            if self.max_prompt_length is None:
                self.max_prompt_length = self.max_length - self.max_completion_length


class IWOPDTrainer(GKDTrainer):
    """IW-OPD of `teacher_model` into `model` (module docstring), as TRL 1.16's trl.experimental.iw_opd
    IWOPDTrainer: GKDTrainer's arguments with IWOPDConfig, on conversations (`messages`; with lmbda 1 they may end
    with the user's turn: the prompt alone) or prompt / completion rows. Prompts keep their last max_prompt_length
    tokens. Logs TRL's iw_opd/mean_advantage, mean_abs_advantage, mean_weight, min_weight, max_weight (each
    micro-batch's, averaged over the log window) and completions/*. With lmbda 1 evaluation samples the eval prompts
    (TRL's scores the dataset's completions, and has none for prompt-only rows). Raises ConfigError as
    GKDTrainer."""

    config_cls = IWOPDConfig

    def __init__(self, model, teacher_model=None, args: IWOPDConfig | None = None, **kwargs):
        self.prompt_only_rows = getattr(args, "lmbda", 1.0) == 1.0  # every completion is sampled
        super().__init__(model, teacher_model, args, **kwargs)

    @property
    def loss_temperature(self) -> float:
        """The sampling temperature: TRL's IW-OPD divides both models' logits by it in the loss."""
        return self.args.temperature

    def prepare(self, dataset) -> list[dict]:
        """GKDTrainer's examples, each prompt cut to its last max_prompt_length tokens and its dataset completion to
        what fits max_length."""
        a = self.args
        examples = super().prepare(dataset)
        for ex in examples:
            if a.max_prompt_length is not None and len(ex["prompt_ids"]) > a.max_prompt_length:
                ex["prompt_ids"] = ex["input_ids"] = ex["prompt_ids"][-a.max_prompt_length:]
            if a.max_length is not None:
                ex["completion_ids"] = ex["completion_ids"][:max(0, a.max_length - len(ex["prompt_ids"]))]
        return examples

    @torch.no_grad()
    def evaluation_pass(self, dataset=None, metric_key_prefix: str = "eval") -> dict:
        """With lmbda 1, on-policy: each eval prompt sampled and scored as in training (prompt-only rows have no
        other completion); else GKD's, on the dataset's completions."""
        if self.prompt_only_rows:
            return GRPOTrainer.evaluation_pass(self, dataset, metric_key_prefix)
        return super().evaluation_pass(dataset, metric_key_prefix)

    def micro_batch_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The IW-OPD loss summed over this micro-batch's completion tokens / num_items (the step's completion
        tokens, all ranks), or GKD's JSD for distillation_objective="jsd"; records TRL's iw_opd/* metrics."""
        a = self.args
        if a.distillation_objective == "jsd":
            return super().micro_batch_loss(batch, num_items)
        mask = batch["completion_mask"].bool()
        ids, att = batch["input_ids"], batch["attention_mask"]
        args = (ids, att, mask, batch.get("completion_positions"), self.sampling_positions(att, None), None)
        targets = ids[:, -mask.shape[1]:][mask]
        student = scored_hidden(self.model, *args)
        logps = self.model.token_logprobs(student, targets, a.temperature)
        with torch.no_grad():
            teacher = self.teacher.token_logprobs(scored_hidden(self.teacher, *args), targets, a.temperature)
            gap = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
                mask, teacher - logps.detach())
            size = gap.abs()
            before = size.cumsum(-1) - size
            total = size.sum(-1, keepdim=True).clamp(min=a.iw_opd_epsilon)
            weight = 1.0 + a.iw_opd_gamma * (1.0 - before / total)
            advantage = (weight * gap)[mask]
        loss = -(logps * advantage).sum() / max(num_items, 1)
        with torch.no_grad():
            w, n = weight[mask], advantage.numel()
            if n:
                self._add_ratio("iw_opd/mean_advantage", advantage.sum(), n)
                self._add_ratio("iw_opd/mean_abs_advantage", size[mask].sum(), n)
                self._add_ratio("iw_opd/mean_weight", w.sum(), n)
                self._add_ratio("iw_opd/min_weight", w.min(), 1)
                self._add_ratio("iw_opd/max_weight", w.max(), 1)
        return loss, loss.detach().to(torch.float64) * num_items
