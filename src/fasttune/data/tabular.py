"""Tabular rows -> ShareGPT conversations, through a prompt pattern that merges several columns into one.

Pattern syntax (`merged_prompt`):
  {name}         the value of column `name` (None becomes "", other values `str()`)
  [[ ... ]]      an optional part: kept only when every column named inside it has text (not empty or blank),
                 else dropped whole, e.g. "{instruction}[[\\nInput:\\n{input}]]" drops the input section for rows
                 whose `input` is empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np

from fasttune.data.formats import row_label
from fasttune.errors import ConfigError, DataError

_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_FIELD = re.compile(r"\{([^{}\[\]]+)\}")


@dataclass(frozen=True)
class _Part:
    text: str  # literal text with {name} fields
    optional: bool

    @property
    def columns(self) -> list[str]:
        return _FIELD.findall(self.text)

    def render(self, row: dict) -> str:
        values = {c: _text(row.get(c)) for c in self.columns}
        if self.optional and any(not v.strip() for v in values.values()):
            return ""
        return _FIELD.sub(lambda m: values[m.group(1)], self.text)


def parse_prompt(merged_prompt: str) -> list[_Part]:
    """Split a pattern into literal/field parts and optional `[[...]]` parts.

    Raises: ConfigError for a pattern that is not a string, or has an unmatched `[[` / `]]` or nested `[[`.
    """
    if not isinstance(merged_prompt, str):
        raise ConfigError(f"merged_prompt must be a string such as '{{instruction}}[[\\nInput:\\n{{input}}]]', "
                          f"not a {type(merged_prompt).__name__}.")
    parts, at = [], 0
    for m in _OPTIONAL.finditer(merged_prompt):
        parts.append(_Part(merged_prompt[at:m.start()], optional=False))
        parts.append(_Part(m.group(1), optional=True))
        at = m.end()
    parts.append(_Part(merged_prompt[at:], optional=False))
    for part in parts:
        if "[[" in part.text or "]]" in part.text:
            raise ConfigError(f"merged_prompt={merged_prompt!r} has an unmatched or nested '[[' / ']]'. Each optional "
                              "part is one '[[...]]' around text and {column} fields, not nested.")
    return [p for p in parts if p.text]


def merge_prompt(parts: Sequence[_Part], row: dict) -> str:
    """The pattern's parts (from parse_prompt) filled from `row`: {name} fields become the column's text (None -> "");
    an optional part is dropped when any column in it is blank."""
    return "".join(p.render(row) for p in parts)


def to_sharegpt(dataset, merged_prompt: str = "{instruction}[[\nYour input is:\n{input}]]",
                merged_column_name: str = "instruction", output_column_name: str = "output",
                remove_unused_columns: bool = True, conversation_extension: int = 1, random_state: int = 3407):
    """Columns -> a ShareGPT `conversations` column: [{"from": "human", "value": prompt}, {"from": "gpt", ...}].

    Args:
        dataset: a `datasets.Dataset` (or DatasetDict: each split).
        merged_prompt: the user turn, a pattern of {column} fields and optional [[...]] parts (module docstring).
        merged_column_name: with remove_unused_columns=False, the merged prompt is also kept in this column.
        output_column_name: the column with the assistant's answer.
        remove_unused_columns: True (default) returns only `conversations`; False keeps every other column
            (of the row the conversation starts from).
        conversation_extension: n > 1 makes each row a conversation of n exchanges: its own, then those of n-1
            rows drawn at random (one random permutation of the rows per extra exchange).
        random_state: seed of those draws.
    Returns: a new `datasets.Dataset` with the same number of rows. Follow with `standardize_sharegpt` for
        {role, content} messages.
    Raises: DataError naming the missing column (and listing the columns) when the pattern or output_column_name
        names one the dataset lacks, or naming the row whose output is null; ConfigError for a bad pattern or
        conversation_extension.
    """
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({k: to_sharegpt(v, merged_prompt, merged_column_name, output_column_name,
                                                    remove_unused_columns, conversation_extension, random_state)
                                     for k, v in dataset.items()})
    if not isinstance(dataset, datasets.Dataset):
        raise ConfigError(f"to_sharegpt takes a datasets.Dataset, not a {type(dataset).__name__}. For a list of "
                          "dicts use datasets.Dataset.from_list(rows).")
    n = conversation_extension
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"conversation_extension={n!r} is invalid: use a whole number >= 1 (1 = one exchange per "
                          "conversation).")
    parts = parse_prompt(merged_prompt)
    needed = list(dict.fromkeys([c for p in parts for c in p.columns] + [output_column_name]))
    for column in needed:
        if column not in dataset.column_names:
            where = "output_column_name" if column == output_column_name else "merged_prompt"
            raise DataError(f"{where} names the column '{column}', which the dataset does not have (columns: "
                            f"{', '.join(map(repr, dataset.column_names)) or 'none'}). Use one of those names.")

    rows = dataset.select_columns(needed).to_dict()
    prompts, answers = [], []
    for i in range(len(dataset)):
        row = {c: rows[c][i] for c in needed}
        if row[output_column_name] is None:
            raise DataError(f"{row_label(i)}: column '{output_column_name}' (the answer) is null. Fill it or drop the "
                            "row (dataset.filter(lambda r: r[...] is not None)).")
        prompts.append(merge_prompt(parts, row))
        answers.append(_text(row[output_column_name]))
    pairs = [[{"from": "human", "value": p}, {"from": "gpt", "value": a}] for p, a in zip(prompts, answers)]
    conversations = [list(pair) for pair in pairs]
    rng = np.random.default_rng(random_state)
    for _ in range(n - 1):
        for i, j in enumerate(rng.permutation(len(pairs)).tolist()):
            conversations[i].extend(pairs[j])

    if remove_unused_columns:
        return datasets.Dataset.from_dict({"conversations": conversations})
    out = dataset.add_column("conversations", conversations) if "conversations" not in dataset.column_names else (
        dataset.remove_columns("conversations").add_column("conversations", conversations))
    if merged_column_name in out.column_names:
        out = out.remove_columns(merged_column_name)
    return out.add_column(merged_column_name, prompts)


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)
