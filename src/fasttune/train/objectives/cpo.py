"""CPO (Xu et al. 2024, "Contrastive Preference Optimization") and its variants SimPO (Meng et al. 2024) and AlphaPO
(Gupta et al. 2025) as TRL 1.16's experimental CPOTrainer computes them. No reference model.

Per pair, with the completion log-probs of the policy (summed over the completion's tokens; their mean for "ipo"
and "simpo") as chosen c and rejected r, and z = c - r (AlphaPO, alpha != 0: z = f(c) - f(r) with f(l) = (1 -
exp(l)^-alpha) / alpha):
- "sigmoid": -(1 - e) log sigmoid(beta z) - e log sigmoid(-beta z), e = label_smoothing;
- "simpo": the same with z - simpo_gamma / beta;
- "hinge": relu(1 - beta z); "ipo": (z - 1 / (2 beta))^2.
The loss is the mean over pairs plus cpo_alpha x the NLL of the chosen completions (mean over their tokens; the
prompt is not scored). With gradient accumulation both means run over the whole accumulated batch (TRL's
micro-batch means weigh its micro-batches equally; the two agree when the micro-batches hold as many pairs and
chosen tokens). Rewards logged: beta x c and beta x r (beta x f(.) with AlphaPO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttune.errors import ConfigError
from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.dpo import check_beta, check_prompt_length
from fasttune.train.objectives.preference_base import PreferenceTrainer, pair_sums

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
MEAN_LOGPS = ("ipo", "simpo")  # losses that take each completion's mean token log-prob instead of its sum


@dataclass
class CPOConfig(TrainingConfig):
    """TrainingConfig plus CPO's fields, as in TRL's experimental CPOConfig. loss_type "alphapo" is TRL's shorthand
    for "simpo" with cpo_alpha=0 (set alpha for AlphaPO's reward shape). Raises ConfigError for beta <= 0, a
    loss_type outside CPO_LOSS_TYPES, label_smoothing outside [0, 0.5), cpo_alpha < 0 or max_prompt_length < 1."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid / simpo: the assumed share of flipped preference labels
    loss_type: str = "sigmoid"
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's CPO default)
    cpo_alpha: float = 1.0  # weight of the chosen completions' NLL (the behaviour-cloning term)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    alpha: float = 0.0  # AlphaPO's reward shape (0: log-prob rewards)
    max_prompt_length: int | None = None  # keep the last tokens of longer prompts
    # TRL's: it truncates completions only for encoder-decoder models (which fasttune does not train); accepted and,
    # for a decoder, unused, as there
    max_completion_length: int | None = None

    def __post_init__(self):
        if self.loss_type == "alphapo":  # TRL's sugar, applied as its CPOConfig applies it
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        super().__post_init__()
        check_beta(self.beta)
        check_prompt_length(self.max_prompt_length)
        check_loss_and_smoothing("CPO", self.loss_type, CPO_LOSS_TYPES, self.label_smoothing, ("sigmoid", "simpo"),
                                 " (TRL warns and drops it)")
        if not self.cpo_alpha >= 0:
            raise ConfigError(f"cpo_alpha={self.cpo_alpha!r} is invalid: the NLL term's weight, >= 0.")


def cpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, args: CPOConfig):
    """(losses, chosen rewards, rejected rewards), each (pairs,), from the completions' log-probs `chosen` and
    `rejected` (sums, or means for MEAN_LOGPS), as TRL's CPOTrainer.cpo_loss (module docstring)."""
    beta, e, alpha = args.beta, args.label_smoothing, args.alpha
    if alpha:
        chosen, rejected = ((1 - torch.exp(-alpha * v)) / alpha for v in (chosen, rejected))  # (1 - p^-alpha)/alpha
    z = chosen - rejected
    if args.loss_type == "simpo":
        z = z - args.simpo_gamma / beta
    if args.loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * z) * (1 - e) - F.logsigmoid(-beta * z) * e
    elif args.loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:  # ipo
        losses = (z - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


class CPOTrainer(PreferenceTrainer):
    """CPO / SimPO / AlphaPO on paired rows (prompt, chosen, rejected); no reference model."""

    config_cls = CPOConfig
    method = "CPO"

    def prepare_step(self, group, across_ranks):
        """Count the chosen completions' tokens in the accumulated batch: the NLL term's normaliser."""
        n = sum(int(b["completion_mask"][: b["input_ids"].shape[0] // 2, 1:].sum()) for b in group)
        self._nll_tokens = max(1.0, self.dist.sum(n) if across_ranks else n)

    def micro_batch_loss(self, batch: dict, num_items: int):
        """This micro-batch's share of the mean pair loss plus cpo_alpha x the chosen completions' NLL; metrics:
        TRL's rewards/*, logps/* and nll_loss (0 with cpo_alpha=0, as TRL logs it). On a mixture-of-experts model
        whose config has output_router_logits set (TRL's CPO adds the load-balancing loss only then), plus that loss's
        share (with_aux_loss)."""
        args, pairs = self.args, batch["input_ids"].shape[0] // 2
        aux = [] if getattr(self.model.config, "output_router_logits", False) else None
        logps = self.logps(batch, aux_out=aux)  # completion tokens only
        sums_ = logps.sum(-1)
        seq = sums_ / batch["completion_mask"][:, 1:].sum(-1) if args.loss_type in MEAN_LOGPS else sums_
        chosen, rejected = seq.chunk(2)
        losses, chosen_rewards, rejected_rewards = cpo_losses(chosen, rejected, args)
        nll_sum = -sums_[:pairs].sum()
        loss = losses.sum() / num_items
        if args.cpo_alpha:
            loss = loss + args.cpo_alpha * nll_sum / self._nll_tokens
        sums = pair_sums(chosen_rewards, rejected_rewards, chosen, rejected)
        # TRL logs 0 when the term is off (it does not compute it then)
        sums["nll_loss"] = (nll_sum.detach() if args.cpo_alpha else nll_sum.new_zeros(()),
                            batch["completion_mask"][:pairs, 1:].sum())
        return self.report(self.with_aux_loss(loss, sums, aux), sums, num_items)


def check_loss_and_smoothing(method: str, loss_type: str, types: tuple, label_smoothing: float, smoothed: tuple,
                             dropped: str = ""):
    """The reference-free preference configs' (CPO's, TPO's) loss checks. Raises ConfigError for a loss_type outside
    `types`, label_smoothing outside [0, 0.5), or label_smoothing with the hinge or ipo loss (only the losses named
    in `smoothed` smooth); `dropped` adds how TRL treats that case."""
    if loss_type not in types:
        raise ConfigError(f"loss_type={loss_type!r} is not a {method} loss; choose one of {', '.join(types)}.")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing!r} is invalid: the share of flipped labels, in [0, 0.5).")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ConfigError(f"label_smoothing applies to the {' and '.join(smoothed)} losses; loss_type "
                          f"'{loss_type}' ignores it{dropped}. Set label_smoothing=0.0.")
