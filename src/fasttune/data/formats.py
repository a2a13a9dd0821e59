"""Dataset layouts for SFT: which one a dataset uses, and per-row conversion to chat messages.

Layouts, in detection priority:
  tokenized          `input_ids` (+ optional `labels`), used exactly as given
  messages           `messages`: [{"role": "user"|"assistant"|"system"|"tool", "content": str}, ...]
  sharegpt           `conversations`: [{"from": "human"|"gpt"|"system"|"tool", "value": str}, ...]
  alpaca             `instruction` + `output` (+ optional `input`)
  prompt-completion  `prompt` + `completion`
  text               one text column (`dataset_text_field`, default "text")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from fasttune.errors import DataError

FORMATS = ("tokenized", "messages", "sharegpt", "alpaca", "prompt-completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}

# Columns each layout needs ("text" is replaced by dataset_text_field).
REQUIRED_COLUMNS = {
    "tokenized": ("input_ids",),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
# Columns a layout reads when present (chat rows pass `tools` / `documents` to the chat template).
OPTIONAL_COLUMNS = {"tokenized": ("labels",), "alpaca": ("input",), "messages": ("tools", "documents"),
                    "sharegpt": ("tools", "documents")}


def layouts_help(dataset_text_field: str = "text") -> str:
    """One sentence listing the accepted SFT layouts and their columns, for error messages; `dataset_text_field` names
    the text column."""
    return (
        "'input_ids' (already tokenized, optional 'labels'), "
        "'messages' (list of {role, content}), "
        "'conversations' (ShareGPT: list of {from, value}), "
        "'instruction' + 'output' (Alpaca, optional 'input'), "
        "'prompt' + 'completion', "
        f"or a text column '{dataset_text_field}' (set dataset_text_field to use another column)"
    )


def row_label(index: int, source_name: str | None = None) -> str:
    """How error messages name a row: 0-based, the same index as `dataset[index]`."""
    return f"Row {index} of {source_name}" if source_name else f"Row {index} of the dataset"


def require_dict_rows(rows: list, source_name: str | None = None) -> None:
    """A list given as the dataset must hold at least one dict row."""
    if not rows:
        raise DataError("The list of rows passed as the dataset is empty. Pass at least one training example.")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            where = row_label(i, source_name or "the list passed as the dataset")
            raise DataError(f"{where} is a {type(row).__name__}, not a dict. Every row must be a dict such as "
                            "{'text': ...} or {'messages': [...]}.")


def required_columns(data_format: str, dataset_text_field: str = "text") -> tuple[str, ...]:
    """The columns a layout (one of FORMATS) needs: REQUIRED_COLUMNS, with dataset_text_field as the text layout's one
    column. Raises KeyError for an unknown layout."""
    cols = REQUIRED_COLUMNS[data_format]
    return (dataset_text_field,) if data_format == "text" else cols


def detect_format(
    column_names: Iterable[str],
    override: str | None = "auto",
    *,
    dataset_text_field: str = "text",
    source_name: str | None = None,
) -> str:
    """Return the layout of a dataset with these columns (one of FORMATS).

    `override` forces a layout (its required columns must exist); "auto" or None detects it, in FORMATS' order,
    except that a text column (dataset_text_field) beside ShareGPT `conversations` wins, as TRL reads such rows.
    """
    columns = list(column_names)
    where = source_name or "The dataset"
    override = "auto" if override is None else str(override).strip().lower()
    override = {"prompt_completion": "prompt-completion", "chatml": "messages", "conversations": "sharegpt"}.get(
        override, override
    )
    if override != "auto":
        if override not in FORMATS:
            hint = " (preference data is for DPO/ORPO/KTO, not SFT)" if override == "preference" else ""
            raise DataError(
                f"Unknown data format '{override}'{hint}. Use one of: auto, {', '.join(FORMATS)}."
            )
        missing = [c for c in required_columns(override, dataset_text_field) if c not in columns]
        if missing:
            raise DataError(
                f"{where} was declared as '{override}' data, but it has no column {' or '.join(map(repr, missing))} "
                f"(columns found: {_names(columns)}). Rename the columns, or use data format 'auto' to detect the "
                f"layout; accepted layouts are {layouts_help(dataset_text_field)}."
            )
        return override

    found = [fmt for fmt in FORMATS if all(c in columns for c in required_columns(fmt, dataset_text_field))]
    if found[:1] == ["sharegpt"] and "text" in found:
        # ShareGPT conversations beside the text column the notebooks format them into: the text, as TRL's
        # SFTTrainer reads such a dataset (it does not take `conversations` for chat rows)
        return "text"
    if found:
        return found[0]

    hint = ""
    if "chosen" in columns and "rejected" in columns:
        hint = " It looks like preference data (chosen/rejected), which is for DPO/ORPO/KTO, not SFT."
    elif "instruction" in columns:
        hint = " It has 'instruction' but Alpaca data also needs an 'output' column."
    elif "prompt" in columns:
        hint = " It has 'prompt' but prompt-completion data also needs a 'completion' column."
    raise DataError(
        f"{where} has no column fasttune can train on (columns found: {_names(columns)}).{hint} "
        f"Accepted layouts are {layouts_help(dataset_text_field)}; rename the columns to one of these, "
        "or set dataset_text_field to the column that holds the text."
    )


def _names(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns) if columns else "none"


# ---------------------------------------------------------------------------------------------------------
# Row conversion


def require_text(value: Any, where: str, field: str, *, allow_empty: bool = False) -> str:
    """`value` as a string, or a DataError naming the row and field."""
    if value is None:
        raise DataError(f"{where}: field '{field}' is missing or null. Give every row a string '{field}'.")
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{field}' must be a string, but it is a {type(value).__name__} ({_preview(value)}). "
            f"Store '{field}' as text in every row."
        )
    if not allow_empty and not value.strip():
        raise DataError(
            f"{where}: field '{field}' is empty. Remove the row or give it some text."
        )
    return value


def validate_messages(raw: Any, where: str, field: str = "messages") -> list[dict]:
    """Check an OpenAI-style message list and return a clean copy (null keys dropped).

    A JSON string (as CSV files store lists) is parsed first.
    """
    return _convert_messages(raw, where, field, role_key="role", content_key="content", role_map=None)


def sharegpt_to_messages(raw: Any, where: str, field: str = "conversations") -> list[dict]:
    """ShareGPT turns ({from, value}; human/gpt/system/tool) -> OpenAI-style messages."""
    return _convert_messages(raw, where, field, role_key="from", content_key="value", role_map=SHAREGPT_ROLES)


def _convert_messages(
    raw: Any, where: str, field: str, *, role_key: str, content_key: str, role_map: dict | None
) -> list[dict]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: field '{field}' is a string that is not a JSON list of messages. "
                f"'{field}' must be a list of {{{role_key}, {content_key}}} dicts."
            ) from None
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        raise DataError(
            f"{where}: field '{field}' is empty; every row needs at least one user and one assistant message."
        )
    if not isinstance(raw, (list, tuple)):
        raise DataError(
            f"{where}: field '{field}' must be a list of {{{role_key}, {content_key}}} dicts, "
            f"but it is a {type(raw).__name__} ({_preview(raw)})."
        )
    messages = []
    for j, turn in enumerate(raw):
        at = f"{where}, {field}[{j}]"
        if not isinstance(turn, Mapping):
            raise DataError(
                f"{at} is a {type(turn).__name__}, not a dict. Each message must look like "
                f"{{'{role_key}': ..., '{content_key}': ...}}."
            )
        # Arrow gives every struct the union of all keys, filling absent ones with None: drop those so
        # templates that test `'key' in message` see the message as it was written.
        turn = {k: v for k, v in turn.items() if v is not None}
        rk, ck = role_key, content_key
        if rk not in turn and role_map is not None and "role" in turn:  # ShareGPT column holding role/content
            rk, ck = "role", "content"
        role = turn.pop(rk, None)
        content = turn.pop(ck, None)
        if not isinstance(role, str):
            raise DataError(
                f"{at} has no string '{rk}' (found keys: {', '.join(map(repr, turn)) or 'none'}). "
                f"Each message needs '{rk}' and '{ck}'."
            )
        if role_map is not None:
            if role.lower() not in role_map:
                raise DataError(
                    f"{at} has the unknown role '{role}'. ShareGPT roles must be one of: "
                    f"{', '.join(sorted(role_map))}. Fix the row or map the role before training."
                )
            role = role_map[role.lower()]
        elif role not in CHAT_ROLES:
            raise DataError(
                f"{at} has the unknown role '{role}'. Roles must be one of: {', '.join(CHAT_ROLES)}."
            )
        if not isinstance(content, str) and not (content is None and "tool_calls" in turn):
            what = "missing" if content is None else f"a {type(content).__name__}"
            raise DataError(
                f"{at}: '{ck}' must be a string, but it is {what}. Only text content is supported "
                "(multimodal content lists are not)."
            )
        messages.append({"role": role, "content": content, **turn})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: field '{field}' has no assistant message, so there is nothing to learn. "
            "Every row needs at least one user and one assistant message."
        )
    return messages


def template_argument(value: Any, where: str, field: str) -> list | None:
    """A row's `tools` / `documents` for the chat template: a list of dicts, or a JSON string of one (as CSV and
    some JSONL files store it); None when absent or empty. Keys Arrow filled with None (it gives every struct the
    union of all rows' keys) are dropped, so each tool reads as it was written."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{field}' is a string that is not JSON ({e.msg}). Store '{field}' as a "
                            "list of objects, or as that list written as JSON.") from None
        return _dict_list(value, where, field)
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    return _dict_list(_drop_none(value), where, field)


def _dict_list(value: Any, where: str, field: str) -> list | None:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise DataError(f"{where}: field '{field}' must be a list of objects (e.g. JSON schemas of functions), but "
                        f"it is {_preview(value)}.")
    return list(value) or None


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def alpaca_fields(row: Mapping, where: str) -> tuple[str, str, str]:
    """An Alpaca row's (instruction, input, output); a missing or null `input` is "", and input is stripped. Raises
    DataError naming `where` and the field when instruction or output is missing, not a string or blank, or input is not
    a string."""
    instruction = require_text(row.get("instruction"), where, "instruction")
    output = require_text(row.get("output"), where, "output")
    extra = row.get("input")
    extra = "" if extra is None else require_text(extra, where, "input", allow_empty=True)
    return instruction, extra.strip(), output


def alpaca_to_messages(row: Mapping, where: str) -> list[dict]:
    """An Alpaca row as a user turn (the instruction, then a blank line and the input when there is one) and an
    assistant turn (the output). Raises DataError as alpaca_fields."""
    instruction, extra, output = alpaca_fields(row, where)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def alpaca_prompt(instruction: str, extra: str) -> str:
    """The classic Alpaca prompt layout (our wording) for tokenizers without a chat template."""
    if extra:
        return (
            "The following is an instruction describing a task, together with an input that gives more context. "
            "Write a response that fulfils the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:\n"
        )
    return (
        "The following is an instruction describing a task. Write a response that fulfils the request.\n\n"
        f"### Instruction:\n{instruction}\n\n### Response:\n"
    )


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def message_list(value: Any, at: str, field: str, default_role: str) -> list[dict]:
    """A conversational field as messages: a string becomes one `default_role` message; a list must hold
    {role, content} dicts with a role of CHAT_ROLES and string content, or content None beside `tool_calls` (keys
    Arrow filled with None dropped).
    Used for preference rows (prompt / chosen / rejected / completion) and GRPO prompts. Raises DataError naming
    `at`, the field and the message index otherwise."""
    if isinstance(value, str):
        require_text(value, at, field)
        return [{"role": default_role, "content": value}]
    if value is None:
        raise DataError(f"{at}: field '{field}' is missing or null. Give every row a '{field}' (text or messages).")
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{at}: field '{field}' must be a string or a list of {{role, content}} messages, but it is "
                        f"a {type(value).__name__}.")
    if not value:
        raise DataError(f"{at}: field '{field}' is an empty list. Give it at least one message.")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"{at}, {field}[{j}] is a {type(m).__name__}, not a dict. Each message must look like "
                            "{'role': ..., 'content': ...}.")
        m = {k: v for k, v in m.items() if v is not None or k == "content"}  # Arrow fills absent keys with None
        if m.get("role") not in CHAT_ROLES:
            raise DataError(f"{at}, {field}[{j}] has the role {m.get('role')!r}; use one of {', '.join(CHAT_ROLES)}.")
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and "tool_calls" in m):
            raise DataError(f"{at}, {field}[{j}]: 'content' must be a string, but it is "
                            f"{type(m.get('content')).__name__}.")
        out.append(m)
    return out


def positive_number(value, where: str, name: str) -> float:
    """`value` as a float when it is a positive number; else DataError naming `where` and the field `name`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        raise DataError(f"{where}: {name} must be a positive number, not {value!r}.")
    return number
