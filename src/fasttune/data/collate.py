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


def collate_with(collator, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """A user's data_collator (transformers' Trainer contract: a list of feature dicts -> a batch) over tokenized
    SFT examples: each feature is {"input_ids", "attention_mask" (ones), "labels"}, the keys transformers'
    DataCollatorForSeq2Seq / DataCollatorForLanguageModeling and TRL's collators read. Returns the batch's
    input_ids, attention_mask and labels as long tensors of one shape (a collator may rebuild labels, e.g.
    DataCollatorForLanguageModeling(mlm=False) trains on every non-pad token, as it does under transformers).

    Raises DataError naming what the collator returned when it has no input_ids / attention_mask / labels, or they
    do not share a (batch, length) shape."""
    import torch

    from fasttune.errors import DataError

    def ints(v) -> list[int]:
        """A row of token ids (list, tensor or array) as a plain list: collators pad lists."""
        return v.tolist() if hasattr(v, "tolist") else list(v)

    features = [{"input_ids": ints(ex["input_ids"]), "attention_mask": [1] * len(ex["input_ids"]),
                 "labels": ints(ex["labels"] if ex.get("labels") is not None else ex["input_ids"])}
                for ex in examples]
    name = getattr(collator, "__name__", type(collator).__name__)
    out = collator(features)
    if not isinstance(out, Mapping):
        raise DataError(f"data_collator {name} returned {type(out).__name__}; it must return a dict of input_ids, "
                        f"attention_mask and labels.")
    missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in out]
    if missing:
        raise DataError(f"data_collator {name} returned no {', '.join(missing)} (keys: {sorted(out)}); SFTTrainer "
                        f"trains on its input_ids, attention_mask and labels (-100 = no loss). Use one that builds "
                        f"them, e.g. transformers' DataCollatorForSeq2Seq(tokenizer), or leave data_collator out.")
    batch = {}
    for key in ("input_ids", "attention_mask", "labels"):
        try:
            batch[key] = torch.as_tensor(out[key]).long()
        except (ValueError, TypeError) as e:  # ragged lists: the collator did not pad
            raise DataError(f"data_collator {name} returned a {key} that is not one (batch, length) array ({e}); "
                            f"it must pad the rows to one length.") from None
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    if len(set(shapes.values())) != 1 or batch["input_ids"].dim() != 2:
        raise DataError(f"data_collator {name} returned tensors of shapes {shapes}; input_ids, attention_mask and "
                        f"labels must each be (batch, length).")
    return batch
