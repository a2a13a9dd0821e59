"""The causal-LM output of fasttune's decoder and of the transformers fallback."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class CausalLMOutput(ModelOutput):
    """transformers' causal-LM output (`out.loss`, `out["logits"]`, `out[0]`, `to_tuple()`), plus the two numbers
    gradient accumulation over a whole accumulated batch needs.

    loss: () float, summed target-token cross-entropy / (num_items_in_batch or the batch's own target count);
    logits: (B, T or logits_to_keep, V) in the model's dtype; loss_sum: () fp32 sum; target_count: () int64."""
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # sum of target-token losses (for gradient-accumulation normalisation)
    target_count: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (output_router_logits), unscaled
    router_logits: tuple | None = None  # MoE: one (B*T, E) tensor per sparse layer (output_router_logits)
    # return_token_stats: (2,) fp32 [sum of the target tokens' entropies, how many are their row's first argmax]
    token_stats: torch.Tensor | None = None

    @property
    def num_targets(self) -> int | None:
        """target_count as a Python int (waits for the device), or None without labels."""
        # Read on demand: int() waits for the GPU, which a training step given num_items_in_batch never needs.
        return None if self.target_count is None else int(self.target_count)


def evaluation_as_transformers(model, labels, return_logits) -> bool:
    """Whether a forward with `labels` answers as transformers' causal LMs do under transformers' Trainer evaluation
    (prediction_step reads every field of the output but the loss as the predictions): in eval mode, unless
    return_logits says otherwise, the logits are formed and only transformers' own fields are returned (no
    loss_sum / target_count). fasttune's trainers ask explicitly (return_logits=False or True)."""
    return labels is not None and return_logits is None and not model.training
