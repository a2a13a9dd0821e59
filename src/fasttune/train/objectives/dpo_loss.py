"""DPO's per-pair losses, TRL 1.16's DPOTrainer formulas (`loss_type`, one or several weighted; `f_divergence_type`).

With chosen / rejected log-ratios r_c = log pi(y_c) - log pi_ref(y_c) and r_r (summed over the completion tokens),
the scores s = f'(exp(r)) of the f-divergence (reverse KL, DPO's: s = r; forward KL: 1 - exp(-r); Jensen-Shannon:
log 2 + logsigmoid(r); alpha-divergence: (exp((alpha - 1) r) - 1) / (alpha - 1)) and d = s_c - s_r:
- sigmoid (DPO): -logsigmoid(beta d); hinge (SLiC): relu(1 - beta d); ipo: ((s_c / n_c - s_r / n_r) - 1 / (2 beta))^2
  with n the completion lengths; sigmoid_norm: -logsigmoid(beta (s_c / n_c - s_r / n_r));
- robust (Chowdhury et al. 2024): label_smoothing eps: (-(1 - eps) logsigmoid(beta d) + eps logsigmoid(-beta d)) /
  (1 - 2 eps); exo_pair (Ji et al. 2024): KL of softmax(beta d) over the pair to (1 - eps, eps);
- nca_pair: -logsigmoid(beta r_c) - (logsigmoid(-beta r_c) + logsigmoid(-beta r_r)) / 2; bco_pair: -logsigmoid(beta r_c)
  - logsigmoid(-beta r_r); sppo_hard: (r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2;
- apo_zero: 1 - sigmoid(beta r_c) + sigmoid(beta r_r); apo_down: sigmoid(beta r_c) + 1 - sigmoid(beta (r_c - r_r));
- discopop (Chris Lu et al. 2024): with l = beta d, m = sigmoid(l / tau): -logsigmoid(l) (1 - m) + exp(-l) m;
- aot (Melnyk et al. 2024): the sorted policy log-ratios minus the sorted reference ones, through the robust form
  with eps; aot_unpaired: the sorted r_c minus the sorted r_r (sorting over the micro-batch, as TRL);
- sft: the chosen completions' mean token NLL over the micro-batch, the same for every pair.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fasttune.errors import ConfigError

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SCORED = ("discopop", "exo_pair", "hinge", "ipo", "robust", "sft", "sigmoid", "sigmoid_norm")  # read f_divergence


def check_losses(loss_type, loss_weights, label_smoothing: float, f_divergence_type: str) -> tuple[list, list]:
    """(loss types, weights) of a config: loss_type a name or a list of names, loss_weights None (1 each) or one per
    type. Raises ConfigError naming the field."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [t for t in types if t not in LOSS_TYPES]
    if not types or unknown:
        raise ConfigError(f"loss_type={loss_type!r} is not supported by DPO; use one (or a list) of {LOSS_TYPES}.")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ConfigError(f"loss_weights has {len(weights)} values for {len(types)} loss types {types}; give one "
                          f"weight per loss type (as TRL requires).")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing} is invalid: the assumed share of flipped preference "
                          f"labels, in [0, 0.5).")
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ConfigError("loss_type='exo_pair' needs label_smoothing > 0 (its target distribution is (1 - eps, eps); "
                          "TRL suggests 1e-3).")
    if f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(f"f_divergence_type={f_divergence_type!r} is not supported; use one of {F_DIVERGENCES}.")
    unscored = [t for t in types if t not in SCORED]
    if f_divergence_type != "reverse_kl" and unscored:
        raise ConfigError(f"f_divergence_type={f_divergence_type!r} applies to the losses of the scores {SCORED}, not "
                          f"to {unscored} (as TRL); use f_divergence_type='reverse_kl' with them.")
    return types, [float(w) for w in weights]


def f_scores(ratio: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(exp(ratio)) of the f-divergence `kind` (TRL's f_divergence_type; alpha: f_alpha_divergence_coef)."""
    if kind == "forward_kl":
        return 1 - torch.exp(-ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        t = torch.clamp(((alpha - 1.0) * ratio).float(), max=80.0)
        return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(ratio.dtype)
    return ratio  # reverse KL (DPO), and the alpha -> 1 limit


def pair_losses(kind: str, beta: float, chosen_ratio, rejected_ratio, chosen_scores, rejected_scores, lengths,
                policy, reference, chosen_nll, label_smoothing: float, discopop_tau: float) -> torch.Tensor:
    """Per-pair losses (B,) of one loss type (module docstring). chosen/rejected ratio and scores (B,); lengths:
    (chosen, rejected) completion lengths (B,) each; policy / reference: (chosen, rejected) summed log-probs (B,)
    each (aot); chosen_nll: the micro-batch's mean chosen-token NLL (a scalar; needed for sft only)."""
    d = chosen_scores - rejected_scores
    eps = label_smoothing
    if kind == "sigmoid":
        return -F.logsigmoid(beta * d)
    if kind == "hinge":
        return torch.relu(1 - beta * d)
    if kind in ("ipo", "sigmoid_norm"):
        avg = chosen_scores / lengths[0] - rejected_scores / lengths[1]
        return (avg - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * avg)
    if kind == "exo_pair":
        return (torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - math.log1p(-eps))
                + torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - math.log(eps)))
    if kind == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if kind == "nca_pair":
        c, r = beta * chosen_ratio, beta * rejected_ratio
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if kind == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            delta = (torch.sort(policy[0] - policy[1], dim=0)[0]
                     - torch.sort(reference[0] - reference[1], dim=0)[0])
        else:
            delta = torch.sort(chosen_ratio, dim=0)[0] - torch.sort(rejected_ratio, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if kind == "apo_down":
        return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
    if kind == "discopop":
        logits = beta * d
        mix = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    if kind == "sft":
        return chosen_nll.expand(chosen_ratio.shape)
    raise ConfigError(f"loss_type={kind!r} is not supported by DPO; use one of {LOSS_TYPES}.")
