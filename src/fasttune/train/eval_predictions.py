"""transformers' `compute_metrics` for SFTTrainer's evaluation: the eval pass also keeps each batch's logits (or what
`preprocess_logits_for_metrics(logits, labels)` makes of them) and labels on the host, and at its end calls
`compute_metrics(EvalPrediction(predictions, label_ids))` with numpy arrays laid out as transformers' Trainer
gathers them: the batches joined along the first dimension, shorter ones padded on the right with -100
(transformers' nested_concat padding_index), logits unshifted ((N, T, vocab), in the model's dtype cast to fp32 as
numpy has no bf16). The metrics come back prefixed "eval_", as transformers prefixes them.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError

PAD = -100  # transformers' padding_index for predictions and labels alike


class PredictionGatherer:
    """Collects (predictions, labels) per eval batch and turns them into compute_metrics' result.

    compute_metrics: EvalPrediction -> dict of metrics (None: only gather, for predict()); preprocess: (logits
    (B, T, V), labels (B, T)) -> a tensor with B rows (e.g. the argmax, so the vocab-wide logits of the eval set are
    not all kept), or None. One gatherer serves one pass."""

    def __init__(self, compute_metrics, preprocess=None):
        self.compute_metrics, self.preprocess = compute_metrics, preprocess
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last = None  # (predictions, label_ids) of the last pass

    def add(self, logits: torch.Tensor, labels: torch.Tensor):
        """One eval batch: logits (B, T, V) as the model returns them, labels (B, T) as collated."""
        preds = self.preprocess(logits, labels) if self.preprocess is not None else logits
        self.parts.append((preds.detach().to("cpu"), labels.detach().to("cpu")))

    def metrics(self) -> dict:
        """compute_metrics over the gathered batches ({} when none were gathered, or without compute_metrics), keys
        prefixed "eval_"; the joined arrays stay in `last` (predictions, label_ids) for predict(); resets. Raises
        ConfigError when compute_metrics does not return a dict."""
        if not self.parts:
            return {}
        from transformers import EvalPrediction

        preds, labels = (_joined([p[i] for p in self.parts]) for i in (0, 1))
        self.parts, self.last = [], (preds, labels)
        if self.compute_metrics is None:
            return {}
        out = self.compute_metrics(EvalPrediction(predictions=preds, label_ids=labels))
        if not isinstance(out, dict):
            raise ConfigError(f"compute_metrics returned {type(out).__name__}; it must return a dict of metrics.")
        return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in out.items()}


def _joined(parts: list[torch.Tensor]):
    """Batches joined along dim 0 as numpy, dim 1 padded on the right with -100 to the longest (transformers'
    nested_concat); float tensors as fp32."""
    if parts[0].dim() >= 2:
        width = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [0, width - p.shape[1]], value=PAD)
                 for p in parts]
    joined = torch.cat(parts)
    return (joined.float() if joined.is_floating_point() else joined).numpy()
