"""The eval_batch_loss of objectives that keep metric sums per log window in micro_batch_loss."""
from __future__ import annotations

import torch


class EvalWindow:
    """Mixin for Trainer objectives whose micro_batch_loss adds metric sums to `self._sums[self._window]`: an eval
    batch's sums go to the "eval" window, read by eval_metrics, and training's stay in "train"."""

    _window = "train"

    @torch.no_grad()
    def eval_batch_loss(self, batch: dict) -> tuple[float, int]:
        """(loss sum, count_items) of one eval batch; prepare_step takes its statistics from this batch alone (as
        TRL evaluates preference objectives)."""
        self.prepare_step([batch], across_ranks=False)
        n = self.count_items(batch)
        self._window = "eval"
        try:
            loss, _ = self.micro_batch_loss(batch, n)
        finally:
            self._window = "train"
        return float(loss) * n, n
