"""GRPO's entropy bonus (TRL 1.16's entropy_coef and its adaptive controller, use_adaptive_entropy) as a mixin of
GRPOTrainer (grpo.py): the loss minus coef x the mean entropy of the completion tokens, the controller's step-end
update towards entropy_target, and its state in checkpoints. The entropy itself comes from the policy's forward
(grpo_loss.entropy_bonus)."""
from __future__ import annotations

import math

import torch

from fasttune.train.host_reads import host_values
from fasttune.train.objectives.grpo_loss import entropy_bonus


class EntropyBonus:
    """Needs the trainer's args, model, dist, _metrics and _add_ratio (grpo.py's GRPOTrainer)."""

    def start_entropy_control(self, args) -> None:
        """The controller's state: the coefficient (args.entropy_coef; RLOOConfig has none: 0), the last step's mean
        entropy (inf before the first: no bonus in the first step, as TRL) and the running (sum, count) of this
        step's entropies."""
        self._entropy_coef = getattr(args, "entropy_coef", 0.0)
        self._last_entropy, self._window_entropy = float("inf"), [0.0, 0.0]

    @property
    def _entropy_bonus(self) -> bool:
        """Whether the loss carries an entropy bonus: a nonzero entropy_coef, or the adaptive controller (which may
        bring a zero coefficient up)."""
        return getattr(self.args, "entropy_coef", 0.0) != 0.0 or getattr(self.args, "use_adaptive_entropy", False)

    def _with_entropy_bonus(self, loss: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor,
                            steps: int) -> torch.Tensor:
        """loss - coef x the mean entropy over `mask`'s tokens (/ the step's micro-batches over all ranks in
        training, as TRL divides by gradient_accumulation_steps under DDP's averaging). Adaptive: the coefficient of
        the last step boundary, applied while the last step's mean entropy was <= entropy_target (TRL's gating).
        Records policy_loss (the loss without the bonus, at TRL's scale) and, in training, the entropy sums the
        controller reads at the step's end."""
        a, training = self.args, self.model.training
        coef = self._entropy_coef
        if a.use_adaptive_entropy and not self._last_entropy <= a.entropy_target:
            coef = 0.0
        bonus = entropy_bonus(entropies, mask) / (steps if training else 1)
        # TRL's policy_loss is a rank's loss before its division by gradient_accumulation_steps (the per-completion
        # means) or, for the token-sum types normalised by the whole batch's tokens, the rank's loss (DDP averages
        # ranks where fasttune sums them): fasttune's loss x the step's micro-batches / x ranks.
        scale = 1 if not training else self.dist.world if a.loss_type in ("dapo", "cispo", "vespo") else steps
        self._add_ratio("policy_loss", loss.detach() * scale, 1)
        if training and a.use_adaptive_entropy:
            with torch.no_grad():
                m = mask.float()
                self._window_entropy = [self._window_entropy[0] + (entropies.detach() * m).sum(),
                                        self._window_entropy[1] + m.sum()]
        return loss - coef * bonus

    def objective_state(self) -> dict:
        """The adaptive entropy controller's coefficient and last step's mean entropy (None before the first step),
        so a resumed run continues it (TRL keeps them in entropy_ctrl_state.json); {} without the controller."""
        if not getattr(self.args, "use_adaptive_entropy", False):
            return {}
        last = self._last_entropy
        return {"entropy_coef": self._entropy_coef, "last_entropy": None if math.isinf(last) else last}

    def load_objective_state(self, state: dict) -> None:
        """Restore objective_state's {"entropy_coef": float, "last_entropy": float nats or None} from a checkpoint
        (ignored without use_adaptive_entropy, or when the checkpoint has none: an older one, or a run without the
        controller)."""
        if "entropy_coef" in state and getattr(self.args, "use_adaptive_entropy", False):
            last = state["last_entropy"]
            self._entropy_coef, self._last_entropy = state["entropy_coef"], float("inf") if last is None else last

    def prepare_step(self, group: list[dict], across_ranks: bool) -> None:
        """Counts this rank's micro-batches of the optimizer step, so the entropy controller updates after the last
        (_step_end); with top_entropy_quantile under torchrun, whether every rank runs as many (then the entropy
        threshold is taken over all ranks' tokens, a collective per micro-batch)."""
        super().prepare_step(group, across_ranks)
        self._micro_left = len(group) if across_ranks else 0
        if across_ranks and self.dist.active and getattr(self.args, "top_entropy_quantile", 1.0) < 1.0:
            self._lockstep = self.dist.sum(len(group)) == len(group) * self.dist.world

    def _step_end(self):
        """After each training micro-batch: at the step's last one, with an entropy bonus, log entropy_coef and
        (adaptive) move it by entropy_coef_delta towards keeping the step's mean entropy (all ranks) at
        entropy_target."""
        if not self.model.training or getattr(self, "_micro_left", 0) <= 0:
            return
        self._micro_left -= 1
        if self._micro_left or not self._entropy_bonus:
            return
        a = self.args
        if a.use_adaptive_entropy:
            s, n = (self.dist.sum(v) for v in host_values(self._window_entropy))
            self._last_entropy = s / max(n, 1.0)
            if self._last_entropy <= a.entropy_target:
                self._entropy_coef = min(self._entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
            else:
                self._entropy_coef = max(self._entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
            self._window_entropy = [0.0, 0.0]
        self._metrics["entropy_coef"].append(self._entropy_coef)
