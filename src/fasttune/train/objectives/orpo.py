"""ORPO (Hong et al. 2024) as TRL 1.16 computes it: the NLL of the chosen rows (prompt and completion tokens, mean
over tokens) minus beta x the mean log-sigmoid of the log odds ratio of per-token mean completion log-probs.
No reference model. With gradient accumulation both means run over the whole accumulated batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttune.train.config import TrainingConfig
from fasttune.train.objectives.dpo import check_beta, check_prompt_length
from fasttune.train.objectives.preference_base import PreferenceTrainer, pair_sums


@dataclass
class ORPOConfig(TrainingConfig):
    """TrainingConfig plus ORPO's fields, as in TRL's ORPOConfig. Raises ConfigError for beta <= 0 or
    max_prompt_length < 1."""

    beta: float = 0.1  # lambda in the paper: weight of the odds-ratio term
    disable_dropout: bool = True  # TRL's: every nn.Dropout of the model (LoRA's too) set to p=0 (TRL's ORPO default)
    max_prompt_length: int | None = None  # keep the last tokens of longer prompts
    # TRL's: it truncates completions only for encoder-decoder models (which fasttune does not train), so a
    # decoder's completions are not cut by it there or here; accepted, as the peer's ORPO notebook passes it
    max_completion_length: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        check_prompt_length(self.max_prompt_length)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOTrainer(PreferenceTrainer):
    """ORPO on paired rows (prompt, chosen, rejected); no reference model."""

    config_cls = ORPOConfig
    method = "ORPO"

    def prepare_step(self, group, across_ranks):
        """Count the chosen rows' target tokens in the accumulated batch: the NLL term's normaliser."""
        # Target tokens of the chosen rows (prompt included, as TRL's NLL): the NLL term's normaliser.
        n = sum(int(b["attention_mask"][: b["input_ids"].shape[0] // 2, 1:].sum()) for b in group)
        self._nll_tokens = max(1.0, self.dist.sum(n) if across_ranks else n)

    def micro_batch_loss(self, batch: dict, num_items: int):
        """This micro-batch's share of NLL(chosen) - beta x mean log-sigmoid(log odds ratio); metrics include
        nll_loss, log_odds_ratio and log_odds_chosen (TRL's names). On a mixture-of-experts model whose config has
        output_router_logits set (TRL's ORPO adds the load-balancing loss only then, with the config's
        router_aux_loss_coef), plus that loss's share (with_aux_loss)."""
        beta, pairs = self.args.beta, batch["input_ids"].shape[0] // 2
        aux = [] if getattr(self.model.config, "output_router_logits", False) else None
        logps = self.logps(batch, "attention_mask", aux_out=aux)  # every token: the NLL needs the prompt's too
        nll_sum = -logps[:pairs].sum()
        completion = batch["completion_mask"][:, 1:]
        mean_logps = (logps * completion).sum(-1) / completion.sum(-1)
        chosen, rejected = mean_logps.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        loss = nll_sum / self._nll_tokens - beta * ratio.sum() / num_items
        sums = pair_sums(beta * chosen, beta * rejected, chosen, rejected)
        sums["nll_loss"] = (nll_sum.detach(), batch["attention_mask"][:pairs, 1:].sum())
        sums["log_odds_ratio"] = (ratio.detach().sum(), pairs)
        sums["log_odds_chosen"] = (log_odds.detach().sum(), pairs)
        return self.report(self.with_aux_loss(loss, sums, aux), sums, num_items)
