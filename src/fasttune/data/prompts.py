"""Prompt-only rows (GRPO's): a row's `prompt`, a string or a list of messages, -> the prompt as the reward
functions see it and its token ids, encoded as TRL encodes them.

    prompt, ids = encode_prompt(row.get("prompt"), tokenizer, row_label(i, name))
"""

from __future__ import annotations

import warnings
from typing import Any

from fasttune.data.encode import without_second_bos
from fasttune.data.formats import message_list, require_text
from fasttune.data.templates import render_chat
from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import DataError


def encode_prompt(value: Any, tokenizer, where: str, **template_kwargs) -> tuple[str | list[dict], list[int]]:
    """A row's `prompt` field -> (prompt, token ids).

    A string is tokenized with the tokenizer's special tokens (e.g. a BOS), as TRL encodes plain-text prompts, but
    a string that already starts with the BOS token (rendered with the chat template) keeps one BOS, as
    apply_chat_template(tokenize=True) gives (TRL 1.16 adds a second; a UserWarning says so). A
    list of {role, content} messages (a string role/content per message, formats.message_list) is rendered with
    the tokenizer's chat template and the header of the assistant turn (add_generation_prompt), then tokenized
    without adding special tokens (the template writes its own), as apply_chat_template(tokenize=True) does.

    Args:
        value: the field's value: a non-empty string or a non-empty list of message dicts.
        tokenizer: a transformers tokenizer (with a chat_template for message lists).
        where: the row, for messages (formats.row_label).
        template_kwargs: chat-template variables for message lists (TRL's chat_template_kwargs).
    Returns: (the string, or the validated message list; the token ids as a list of ints, at least one).
    Raises: DataError naming `where` and the field when the value is missing, empty or of the wrong type, a
        message is malformed, the tokenizer has no chat template for a message list, the template fails, or the
        prompt encodes to no tokens.
    """
    if value is None:
        raise DataError(f"{where}: field 'prompt' is missing or null. GRPO rows need a 'prompt': a string or "
                        f"a list of messages ({{'role': 'user', 'content': ...}}).")
    if isinstance(value, str):
        prompt = require_text(value, where, "prompt")
        ids = list(text_tokenizer(tokenizer)(prompt)["input_ids"])
        once = without_second_bos(tokenizer, prompt, ids)
        if len(once) < len(ids):  # one message for the whole dataset (Python shows a repeated warning once)
            warnings.warn(f"GRPO prompts already start with the BOS token {tokenizer.bos_token!r} (rendered with the "
                          f"chat template): no second BOS was added.", UserWarning, stacklevel=2)
        ids = once
    else:
        prompt = message_list(value, where, "prompt", "user")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: field 'prompt' is a message list but the tokenizer has no chat "
                            f"template. Set chat_template (e.g. 'chatml') or give prompts as strings.")
        text = render_chat(tokenizer, prompt, where, add_generation_prompt=True, **template_kwargs)
        ids = list(text_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"{where}: field 'prompt' encodes to no tokens; give it some text.")
    return prompt, ids
