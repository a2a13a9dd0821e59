"""Datasets -> tokenized SFT examples -> batches.

    rows = load_rows("data.jsonl")                       # datasets.Dataset
    examples = tokenize_rows(rows, tokenizer, max_seq_length=2048, train_on_responses_only=True)
    batch = collate(examples[:8], tokenizer.pad_token_id)
    n = count_targets(batch["labels"])                   # loss tokens after the causal shift
"""

from pathlib import Path

from fasttune.data.sources import load_rows
from fasttune.data.formats import detect_format
from fasttune.data.tokenize import tokenize_rows
from fasttune.data.collate import collate, count_targets


def demo_dataset_path() -> Path:
    """Path of the bundled demo dataset (messages layout, ~120 short Q&A rows in one distinctive style)."""
    return Path(__file__).resolve().parent / "demo" / "demo.jsonl"


__all__ = ["load_rows", "detect_format", "tokenize_rows", "collate", "count_targets", "demo_dataset_path"]
