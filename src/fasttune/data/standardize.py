"""Chat columns in other spellings -> the standard one: a list of {"role", "content"} with roles
system/user/assistant.

`standardize_sharegpt` rewrites a ShareGPT `conversations` column ({"from": "human"|"gpt"|..., "value": ...});
`standardize_data_formats` first looks for the column that holds conversations (under whichever name and keys) and
leaves data that is already standard, or holds no conversations, as it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from fasttune.data.formats import row_label
from fasttune.errors import ConfigError, DataError

SYSTEM_ALIASES = ("system",)
USER_ALIASES = ("user", "human", "input")
ASSISTANT_ALIASES = ("gpt", "assistant", "output")
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = ("content", "value", "text")
STANDARD_ROLES = ("system", "user", "assistant", "tool")
# Column names that usually hold conversations, checked first; any other list-of-dicts column with a role key and a
# text key is found too.
CONVERSATION_COLUMNS = ("conversations", "messages", "conversation", "dialog", "dialogue", "chat")


class ConversationStandardizer:
    """`datasets.Dataset.map` function (one row, with its index): `column` -> list of {role, content}.

    Picklable and plain, so datasets can fingerprint it and cache the result.
    """

    def __init__(self, column: str, roles: dict[str, str]):
        self.column = column
        self.roles = roles  # alias (lower case) -> standard role

    def __call__(self, row: Mapping, index: int) -> dict:
        return {self.column: self.convert(row.get(self.column), row_label(index))}

    def convert(self, raw: Any, where: str) -> list[dict]:
        """One row's conversation (a list, or a JSON string of one, as CSV files store it) -> [{"role", "content"}] with
        the roles mapped through `roles` (keys read: role/from, content/value/text). Raises DataError naming `where` and
        the message for an empty or non-list value, a message that is not a dict or lacks a role or text, a role with no
        alias, or non-string content."""
        field = self.column
        if isinstance(raw, str):  # CSV files store lists as JSON text
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                pass  # reported below as not a list
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
            raise DataError(
                f"{where}: field '{field}' must be a non-empty list of messages such as "
                f"{{'from': 'human', 'value': ...}}, but it is {_preview(raw)}. Fix or remove the row."
            )
        out = []
        for j, turn in enumerate(raw):
            at = f"{where}, {field}[{j}]"
            if not isinstance(turn, Mapping):
                raise DataError(f"{at} is a {type(turn).__name__}, not a dict. Each message must look like "
                                "{'from': 'human', 'value': '...'} or {'role': 'user', 'content': '...'}.")
            role_key = next((k for k in ROLE_KEYS if turn.get(k) is not None), None)
            content_key = next((k for k in CONTENT_KEYS if turn.get(k) is not None), None)
            if role_key is None or content_key is None:
                keys = ", ".join(repr(k) for k, v in turn.items() if v is not None) or "none"
                raise DataError(f"{at} has no {'role' if role_key is None else 'text'} (found keys: {keys}). Each "
                                "message needs 'from' and 'value' (or 'role' and 'content').")
            role, content = turn[role_key], turn[content_key]
            standard = self.roles.get(str(role).lower()) if isinstance(role, str) else None
            if standard is None:
                raise DataError(
                    f"{at} has the role {role!r}, which is none of the aliases ({', '.join(sorted(self.roles))}). "
                    "Add it to aliases_for_system, aliases_for_user or aliases_for_assistant, or fix the row."
                )
            if not isinstance(content, str):
                raise DataError(f"{at}: '{content_key}' must be a string, but it is a {type(content).__name__}. "
                                "Only text messages are supported.")
            out.append({"role": standard, "content": content})
        return out


def role_table(aliases_for_system: Sequence[str] = SYSTEM_ALIASES, aliases_for_user: Sequence[str] = USER_ALIASES,
               aliases_for_assistant: Sequence[str] = ASSISTANT_ALIASES) -> dict[str, str]:
    """Alias (lower case) -> standard role. Raises ConfigError when one alias is given for two roles."""
    table: dict[str, str] = {}
    for role, aliases in (("system", aliases_for_system), ("user", aliases_for_user),
                          ("assistant", aliases_for_assistant)):
        if isinstance(aliases, str) or not all(isinstance(a, str) for a in aliases):
            raise ConfigError(f"aliases_for_{role} must be a list of strings, e.g. {list(SYSTEM_ALIASES)}; "
                              f"got {aliases!r}.")
        for alias in aliases:
            key = alias.lower()
            if table.get(key, role) != role:
                raise ConfigError(f"The role alias {alias!r} is given for both '{table[key]}' and '{role}'; "
                                  "give each alias to one role.")
            table[key] = role
    return table


def standardize_sharegpt(dataset, aliases_for_system: Sequence[str] = SYSTEM_ALIASES,
                         aliases_for_user: Sequence[str] = USER_ALIASES,
                         aliases_for_assistant: Sequence[str] = ASSISTANT_ALIASES, column: str | None = None):
    """ShareGPT rows -> standard messages, in the same column.

    Args:
        dataset: a `datasets.Dataset` (or DatasetDict: each split) with a `conversations` column (else `messages`)
            of [{"from": ..., "value": ...}, ...] (messages already in {role, content} pass through).
        aliases_for_system/user/assistant: role names (case-insensitive) that mean each standard role.
        column: the column to convert, when it is neither `conversations` nor `messages`.
    Returns: the dataset with that column as [{"role": "system"|"user"|"assistant", "content": str}, ...];
        other columns unchanged.
    Raises: DataError naming the row (and message) for a row that is not a list of messages, a message without a
        role or text, a role none of the aliases names, or non-text content; DataError when the column is missing;
        ConfigError for bad alias lists.
    """
    roles = role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)

    def one(ds: datasets.Dataset) -> datasets.Dataset:
        name = column or next((c for c in ("conversations", "messages") if c in ds.column_names), None)
        if name is None or name not in ds.column_names:
            wanted = repr(column) if column else "'conversations' (or 'messages')"
            raise DataError(f"The dataset has no column {wanted} to standardize (columns found: "
                            f"{', '.join(map(repr, ds.column_names)) or 'none'}). Pass column='...' to name it.")
        return _convert(ds, name, roles)

    return _per_split(dataset, one, "standardize_sharegpt")


def standardize_data_formats(dataset, aliases_for_system: Sequence[str] = SYSTEM_ALIASES,
                             aliases_for_user: Sequence[str] = USER_ALIASES,
                             aliases_for_assistant: Sequence[str] = ASSISTANT_ALIASES):
    """Find the column that holds conversations and standardize it like `standardize_sharegpt`.

    Args: as `standardize_sharegpt` (the aliases); the conversation column is found by its name
        (CONVERSATION_COLUMNS) or, failing that, as the first list-of-dicts column with a role key (role/from) and a
        text key (content/value/text).
    Returns: the dataset with that column as standard messages; the very same object when its messages are already
        {role, content} with standard roles, or when no column holds conversations (e.g. Alpaca or text data).
    Raises: DataError for bad rows, as `standardize_sharegpt`.
    """
    roles = role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)

    def one(ds: datasets.Dataset) -> datasets.Dataset:
        name = conversation_column(ds.features)
        if name is None or _already_standard(ds, name):
            return ds
        return _convert(ds, name, roles)

    return _per_split(dataset, one, "standardize_data_formats")


def conversation_column(features: datasets.Features) -> str | None:
    """The column whose type is a list of dicts with a role key and a text key (known names first), or None."""
    candidates = [c for c in CONVERSATION_COLUMNS if c in features]
    candidates += [c for c in features if c not in candidates]
    for name in candidates:
        keys = _message_keys(features[name])
        if keys and any(k in keys for k in ROLE_KEYS) and any(k in keys for k in CONTENT_KEYS):
            return name
    return None


def _message_keys(feature) -> set[str] | None:
    inner = getattr(feature, "feature", None)  # datasets.List / LargeList / Sequence
    if inner is None and isinstance(feature, list) and len(feature) == 1:
        inner = feature[0]
    if isinstance(inner, dict):
        return set(inner)
    return None


def _already_standard(ds: datasets.Dataset, name: str) -> bool:
    keys = _message_keys(ds.features[name]) or set()
    if not {"role", "content"} <= keys or keys & {"from", "value"}:
        return False
    column = ds.data.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    turns = pc.list_flatten(column)
    roles = set(pc.unique(pc.struct_field(turns, "role")).to_pylist())
    return roles <= set(STANDARD_ROLES)


def _convert(ds: datasets.Dataset, name: str, roles: dict[str, str]) -> datasets.Dataset:
    features = ds.features.copy()
    features[name] = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    return ds.map(ConversationStandardizer(name, roles), with_indices=True, features=features,
                  desc="Standardizing")


def _per_split(dataset, fn, what: str):
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({split: fn(ds) for split, ds in dataset.items()})
    if isinstance(dataset, datasets.Dataset):
        return fn(dataset)
    raise ConfigError(f"{what} takes a datasets.Dataset (e.g. load_dataset(..., split='train')) or a DatasetDict, "
                      f"not a {type(dataset).__name__}. For a list of dicts use datasets.Dataset.from_list(rows).")


def _preview(value: Any, limit: int = 60) -> str:
    text = f"a {type(value).__name__} ({value!r})" if value is not None else "missing"
    return text if len(text) <= limit else text[: limit - 4] + "...)"
