"""Render chat rows to text with a chat template: a `messages` or `conversations` column -> a `text` column."""

from __future__ import annotations

import datasets

from fasttune.data import formats, placeholder_template, templates
from fasttune.data.placeholder_template import is_placeholder_template
from fasttune.errors import ConfigError, DataError

TEXT_COLUMN = "text"


class ConversationRenderer:
    """`datasets.Dataset.map` function (one row, with its index): the conversation -> {"text": rendered}."""

    def __init__(self, tokenizer, column: str, template: str | None, default_system_message: str | None):
        self.tokenizer = tokenizer
        self.column = column
        self.template = template  # None: the tokenizer's own
        self.default_system_message = default_system_message

    def __call__(self, row: dict, index: int) -> dict:
        where = formats.row_label(index)
        # ShareGPT keys and roles or the standard ones, in either column.
        messages = formats.sharegpt_to_messages(row.get(self.column), where, self.column)
        if self.default_system_message is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system_message}, *messages]
        return {TEXT_COLUMN: templates.render_chat(self.tokenizer, messages, where, chat_template=self.template)}


def render_dataset(dataset, tokenizer, chat_template: str | None = None, default_system_message: str | None = None,
                   num_proc: int | None = None):
    """Render each row's conversation to a `text` column.

    Args:
        dataset: a `datasets.Dataset` (or DatasetDict: each split) with a `messages` or `conversations` column
            (standard {role, content} or ShareGPT {from, value} messages).
        tokenizer: renders with its chat template, or with `chat_template` (a built-in name, a Jinja string, or
            text with {INPUT}/{OUTPUT}/{SYSTEM} placeholders: fasttune.data.placeholder_template).
        default_system_message: a system message for conversations that have none.
        num_proc: processes for `datasets.Dataset.map`.
    Returns: the dataset with a `text` column (exactly what the template writes, with add_generation_prompt off)
        instead of the conversation column; other columns are kept.
    Raises: ConfigError when there is no template (listing the built-in names) or the tokenizer lacks a named
        template's special tokens; DataError for a missing conversation column or a bad row (naming it).
    """
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({k: render_dataset(v, tokenizer, chat_template, default_system_message, num_proc)
                                     for k, v in dataset.items()})
    if not isinstance(dataset, datasets.Dataset):
        raise ConfigError(f"apply_chat_template takes a datasets.Dataset, not a {type(dataset).__name__}. For a list "
                          "of dicts use datasets.Dataset.from_list(rows).")
    column = next((c for c in ("messages", "conversations") if c in dataset.column_names), None)
    if column is None:
        raise DataError(f"The dataset has no 'messages' or 'conversations' column to render (columns found: "
                        f"{', '.join(map(repr, dataset.column_names)) or 'none'}). Build one with to_sharegpt, or "
                        "rename the column that holds the conversations.")
    template = None
    if is_placeholder_template(chat_template):
        template = placeholder_template.to_jinja(chat_template, tokenizer, default_system_message)
    elif chat_template is not None:
        templates.check_template_tokens(chat_template, tokenizer, error=ConfigError)
        template = templates.resolve_chat_template(chat_template)
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"The tokenizer has no chat template to render the conversations. Set one with "
                          f"get_chat_template(tokenizer, name) or pass chat_template= (one of: {templates.names()}, "
                          "or a Jinja string).")
    if TEXT_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(TEXT_COLUMN)
    return dataset.map(ConversationRenderer(tokenizer, column, template, default_system_message), with_indices=True,
                       remove_columns=[column], num_proc=num_proc, desc="Rendering")
