"""Datasets -> tokenized SFT examples -> batches.

    rows = load_rows("data.jsonl")                       # datasets.Dataset
    examples = tokenize_rows(rows, tokenizer, max_seq_length=2048, train_on_responses_only=True)
    batch = collate(examples[:8], tokenizer.pad_token_id)
    n = count_targets(batch["labels"])                   # loss tokens after the causal shift
"""

from pathlib import Path

# `collate` is also a submodule's name: importing it here keeps the attribute the function (importing a submodule
# later would otherwise set it to the module). collate.py imports torch only when called.
from fasttune.data.collate import collate, count_targets

# Imported on first use (PEP 562): `datasets` and torch are slow to import, and the command line checks its
# arguments before it needs them; it also keeps data/encode and data/tokenize free of a cycle through here.
_LAZY = {"load_rows": "sources", "detect_format": "formats", "tokenize_rows": "tokenize"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fasttune.data' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"fasttune.data.{_LAZY[name]}"), name)


def demo_dataset_path() -> Path:
    """Path of the bundled demo dataset (messages layout, ~120 short Q&A rows in one distinctive style)."""
    return Path(__file__).resolve().parent / "demo" / "demo.jsonl"


def demo_heldout_path() -> Path:
    """Path of a few rows in the demo set's style that are not in it (the demo run's before/after sample prompt)."""
    return Path(__file__).resolve().parent / "demo" / "heldout.jsonl"


def demo_sample_prompt() -> str:
    """The user prompt of the first held-out demo row: a question the demo run never trains on."""
    import json

    first = demo_heldout_path().read_text(encoding="utf-8").splitlines()[0]
    return json.loads(first)["messages"][0]["content"]


__all__ = ["load_rows", "detect_format", "tokenize_rows", "collate", "count_targets", "demo_dataset_path",
           "demo_heldout_path", "demo_sample_prompt"]
