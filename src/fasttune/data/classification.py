"""Labelled rows for a sequence classifier -> token ids and label values, and their batches.

A row holds a text (the `dataset_text_field` column, "text" by default; or a `messages` list, rendered whole with the
chat template) and a label (the `label` column): an integer class index or a class name (single-label), a number
(regression, a classifier with one output), or a list of 0/1 values, one per class (multi-label). `label_space`
reads the classes a dataset names, so that a command line run can build the head (num_labels, id2label) before the
model loads; `tokenize_classification_rows` checks every label against the model's head.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from fasttune.data.formats import require_text, row_label
from fasttune.data.preference import _rows_and_columns
from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import DataError

LABEL_FIELD = "label"


def _kind(value, at: str, field: str) -> str:
    """"class" (an int or a name), "number" (a float: regression) or "multi" (a list of 0/1 values)."""
    if isinstance(value, bool):
        raise DataError(f"{at}: '{field}' is {value!r}; give a class index (0, 1, ...), a class name, a number or a "
                        f"list of 0/1 values, one per class.")
    if isinstance(value, (int, str)):
        return "class"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{at}: '{field}' is {value!r}; a regression target must be a finite number.")
        return "number"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in value):
        return "multi"
    raise DataError(f"{at}: '{field}' is {value!r}; give a class index (0, 1, ...), a class name, a number "
                    f"(regression) or a list of 0/1 values, one per class (multi-label).")


def label_space(rows: Any, label_field: str = LABEL_FIELD, source_name: str | None = None) -> dict:
    """The classification head a dataset asks for: {"num_labels", "id2label" (or None), "problem_type"}.
    Integer labels: classes 0..max; names: the sorted distinct names (id2label); floats: regression, one output;
    lists: multi-label, one output per entry. Raises DataError for a missing column, mixed kinds, a negative index,
    lists of different lengths or fewer than two classes."""
    rows, source_name = _rows(rows, source_name)
    where = source_name or "the dataset"
    values = _column(rows, label_field, where)
    kinds = {}
    for i, v in enumerate(values):
        kinds.setdefault(_kind(v, row_label(i, source_name), label_field), i)
    if len(kinds) > 1:
        (a, i), (b, j) = list(kinds.items())[:2]
        raise DataError(f"{where}: the '{label_field}' column mixes kinds of labels ({a} at row {i}, {b} at row {j}); "
                        f"give every row the same kind.")
    kind = next(iter(kinds))
    if kind == "number":
        return {"num_labels": 1, "id2label": None, "problem_type": "regression"}
    if kind == "multi":
        widths = {len(v) for v in values}
        if len(widths) > 1:
            raise DataError(f"{where}: the multi-label lists in '{label_field}' have lengths {sorted(widths)}; give "
                            f"one 0/1 entry per class in every row.")
        return {"num_labels": widths.pop(), "id2label": None, "problem_type": "multi_label_classification"}
    names = {v for v in values if isinstance(v, str)}
    if names and any(not isinstance(v, str) for v in values):
        raise DataError(f"{where}: the '{label_field}' column mixes class indices and class names; use one.")
    if names:
        classes = sorted(names)
        if len(classes) < 2:
            raise DataError(f"{where}: every row has the label {classes[0]!r}; a classifier needs two classes or more.")
        return {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
                "problem_type": "single_label_classification"}
    low, high = min(values), max(values)
    if low < 0:
        raise DataError(f"{where}: '{label_field}' holds the class index {low}; class indices count from 0.")
    if high < 1:
        raise DataError(f"{where}: every row has the label 0; a classifier needs two classes or more.")
    return {"num_labels": high + 1, "id2label": None, "problem_type": "single_label_classification"}


def tokenize_classification_rows(rows: Any, tokenizer, config, *, text_field: str = "text",
                                 label_field: str = LABEL_FIELD, max_seq_length: int, drop_long: bool = False,
                                 chat_template: str | None = None, source_name: str | None = None) -> list[dict]:
    """Rows -> [{"input_ids", "label"}] for a classifier whose transformers config is `config` (num_labels,
    label2id, problem_type). The text is tokenized as the tokenizer does with its special tokens (a `messages` list:
    rendered whole with the chat template); rows longer than max_seq_length keep their start (drop_long: dropped,
    with one warning). Labels: a class name goes through config.label2id, an index must be below num_labels, a
    float needs num_labels 1, a list num_labels entries. Raises DataError naming the row and field."""
    from fasttune.data import templates

    rows, source_name = _rows(rows, source_name)
    where = source_name or "the dataset"
    labels = _column(rows, label_field, where)
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    n = config.num_labels
    template = templates.resolve_chat_template(chat_template) if chat_template else None
    encode = text_tokenizer(tokenizer)
    out, dropped = [], 0
    for i, row in enumerate(rows):
        at = row_label(i, source_name)
        if text_field not in row and isinstance(row.get("messages"), list):
            text = templates.render_chat(tokenizer, row["messages"], at, chat_template=template)
            ids = list(encode(text, add_special_tokens=False)["input_ids"])  # the template carries its own BOS
        else:
            if text_field not in row:
                raise DataError(f"{at} has no '{text_field}' field (nor a 'messages' list) to classify; give each row "
                                f"its text (dataset_text_field names the column).")
            ids = list(encode(require_text(row[text_field], at, text_field))["input_ids"])
        if len(ids) > max_seq_length:
            if drop_long:
                dropped += 1
                continue
            ids = ids[:max_seq_length]
        out.append({"input_ids": ids, "label": _label(labels[i], n, names, at, label_field)})
    if not out:
        raise DataError(f"No row is left in {where}: every row is longer than max_seq_length={max_seq_length} "
                        f"tokens and drop_long is set.")
    if dropped:
        warnings.warn(f"Dropped {dropped} of {len(rows)} rows of {where} longer than max_seq_length={max_seq_length} "
                      f"tokens (drop_long=True).", UserWarning, stacklevel=2)
    return out


def collate_classification(examples: list[dict], pad_id: int) -> dict:
    """Examples -> right-padded input_ids / attention_mask (B, L) int64 and labels: (B,) int64 class indices, (B,)
    float32 regression targets or (B, num_labels) float32 multi-label targets."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, ex in enumerate(examples):
        ids[r, :len(ex["input_ids"])] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        mask[r, :len(ex["input_ids"])] = 1
    first = examples[0]["label"]
    dtype = torch.long if isinstance(first, int) else torch.float32
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([ex["label"] for ex in examples], dtype=dtype)}


def _label(value, n: int, names: dict, at: str, field: str):
    kind = _kind(value, at, field)
    if kind == "number":
        if n != 1:
            raise DataError(f"{at}: '{field}' is the number {value!r} (a regression target), but the classifier has "
                            f"{n} outputs; regression needs num_labels=1.")
        return float(value)
    if kind == "multi":
        if len(value) != n:
            raise DataError(f"{at}: '{field}' lists {len(value)} values; the classifier has {n} classes (one 0/1 value "
                            f"each).")
        return [float(v) for v in value]
    if isinstance(value, str):
        if value not in names or not names:
            known = ", ".join(repr(k) for k in sorted(names, key=names.get)) or "none (load the model with id2label)"
            raise DataError(f"{at}: '{field}' is the class name {value!r}, which the classifier does not know; its "
                            f"classes: {known}.")
        return names[value]
    if not 0 <= value < n:
        raise DataError(f"{at}: '{field}' is the class index {value}; the classifier has {n} classes (0..{n - 1}).")
    if n == 1:
        return float(value)  # a one-output head is a regression: integer targets are numbers too
    return int(value)


def _rows(rows, source_name):
    """(rows as a list or datasets.Dataset, the data's name for errors or None): data/preference.py's reader, which
    also refuses no rows and rows that are not dicts."""
    rows, _, source_name = _rows_and_columns(rows, source_name)
    return rows, source_name


def _column(rows, field: str, where: str) -> list:
    if isinstance(rows, list):
        missing = next((i for i, r in enumerate(rows) if field not in r), None)
        if missing is not None:
            raise DataError(f"Row {missing} of {where} has no '{field}' field; give every row its label (class index, "
                            f"class name, number or 0/1 list).")
        return [r[field] for r in rows]
    if field not in rows.column_names:
        raise DataError(f"{where[0].upper() + where[1:]} has no '{field}' column (columns: "
                        f"{', '.join(map(repr, rows.column_names))}); give every row its label.")
    return list(rows[field])
