"""Batching of tokenized SFT examples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from fasttune.constants import IGNORE_INDEX


def collate(
    examples: Sequence[Mapping],
    pad_token_id: int | None,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad examples ({"input_ids", "labels"}) into long tensors.

    Returns input_ids (padded with pad_token_id), attention_mask (1 real / 0 pad) and labels (-100 on
    padding). Pad positions are masked in both attention and loss, so any pad id works; None means 0.
    """
    import torch  # here, not at import: `fasttune.data` loads this module and must stay quick to import

    if not examples:
        raise ValueError("collate() needs at least one example")
    pad = 0 if pad_token_id is None else int(pad_token_id)
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        ex_labels = ex.get("labels")
        if ex_labels is None:
            ex_labels = ex["input_ids"]
        if len(ex_labels) != n:
            raise ValueError(f"example {row}: labels has {len(ex_labels)} entries, input_ids has {n}")
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(ex_labels, dtype=torch.long)
    batch_out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in ("position_ids", "segment_ids"):  # packed rows (data/packing.py); padding gets 0
        if key in examples[0]:
            col = torch.zeros((batch, width), dtype=torch.long)
            for row, (ex, n) in enumerate(zip(examples, lengths)):
                col[row, :n] = torch.as_tensor(ex[key], dtype=torch.long)
            batch_out[key] = col
    return batch_out


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss after the causal shift (position t predicts token t+1)."""
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())
