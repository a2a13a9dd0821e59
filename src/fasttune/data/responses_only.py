"""Response-only masks on token ids, from the marker strings that open user and assistant turns.

Rule: in every sequence (every document of a packed row), the tokens after each occurrence of `response_part`
up to the next occurrence of `instruction_part` (or the end of the document) are targets; everything else (system
prompt, user turns, the markers themselves) is not. The assistant's end-of-turn marker lies inside that range, so it
is a target and the model learns to stop.

Matching is on token ids: each part is tokenized alone (no special tokens added) and searched for in the row's
`input_ids`. When the parts are not given, `derive_parts` reads them off the chat template by rendering a probe
conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fasttune.constants import IGNORE_INDEX
from fasttune.errors import ConfigError

_PROBE_USER = ("fasttune probe question one", "fasttune probe question two")
_PROBE_ASSISTANT = ("fasttune probe answer one", "fasttune probe answer two")


def derive_parts(tokenizer, chat_template: str | None = None) -> tuple[str, str]:
    """(instruction_part, response_part) of a chat template: the text that opens a user turn and an assistant turn.

    The response part is what `add_generation_prompt=True` appends after a user turn (for templates whose generation
    prompt is empty, the text between the user's and the assistant's words); the instruction part is the text a
    second user turn adds before its words, without surrounding whitespace.

    Args: tokenizer: a transformers tokenizer; chat_template: a Jinja string to use instead of its own.
    Raises: ConfigError when there is no template, it cannot render a user/assistant probe, or the parts cannot be
        told apart (then pass instruction_part and response_part yourself).
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            "train_on_responses_only needs instruction_part and response_part (e.g. '<|im_start|>user\\n' and "
            "'<|im_start|>assistant\\n'), or a tokenizer with a chat template to derive them from; this tokenizer has "
            "none. Pass both parts, or set a template first with fasttune.chat_templates.get_chat_template."
        )
    u1, u2 = ({"role": "user", "content": c} for c in _PROBE_USER)
    a1 = {"role": "assistant", "content": _PROBE_ASSISTANT[0]}

    def render(messages, gen=False):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                                 chat_template=template)
        except Exception as e:  # jinja errors of any kind
            raise ConfigError(
                f"Could not derive the instruction/response parts: the chat template fails on a plain user/assistant "
                f"conversation ({type(e).__name__}: {e}). Pass instruction_part and response_part yourself."
            ) from e

    first, first_gen, two, three = render([u1]), render([u1], True), render([u1, a1]), render([u1, a1, u2])
    response = first_gen[len(first):] if first_gen.startswith(first) and len(first_gen) > len(first) else ""
    if not response.strip():  # e.g. Mistral: the answer follows [/INST] with no generation prompt
        lo, hi = two.find(_PROBE_USER[0]), two.find(_PROBE_ASSISTANT[0])
        response = two[lo + len(_PROBE_USER[0]):hi].strip() if 0 <= lo < hi else ""
    instruction = ""
    if three.startswith(two) and _PROBE_USER[1] in three[len(two):]:
        added = three[len(two):]
        instruction = added[:added.index(_PROBE_USER[1])].strip()
    if not response.strip() or not instruction or instruction == response.strip():
        raise ConfigError(
            "Could not derive where user and assistant turns start from the chat template "
            f"(got instruction_part={instruction!r}, response_part={response!r}). Pass instruction_part and "
            "response_part yourself, e.g. '<|im_start|>user\\n' and '<|im_start|>assistant\\n' for ChatML."
        )
    return instruction, response


def part_ids(tokenizer, part: str, name: str) -> list[int]:
    """The token ids of one marker string, tokenized alone without special tokens. Raises ConfigError if empty."""
    if not isinstance(part, str) or not part:
        raise ConfigError(f"{name} must be a non-empty string such as '<|im_start|>assistant\\n', got {part!r}.")
    ids = list(tokenizer(part, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"{name}={part!r} tokenizes to nothing; pass the marker text as it appears in the rows.")
    return ids


def find_all(ids: np.ndarray, pattern: Sequence[int]) -> list[int]:
    """Start positions of every occurrence of `pattern` in `ids` (non-overlapping scan is not needed: all)."""
    m = len(pattern)
    if m == 0 or len(ids) < m:
        return []
    candidates = np.flatnonzero(ids[: len(ids) - m + 1] == pattern[0])
    if m == 1:
        return candidates.tolist()
    pat = np.asarray(pattern)
    return [int(p) for p in candidates if np.array_equal(ids[p:p + m], pat)]


def response_targets(input_ids: Sequence[int], instruction_ids: Sequence[int], response_ids: Sequence[int],
                     doc_lengths: Sequence[int] | None = None) -> tuple[np.ndarray, bool, bool]:
    """Which tokens are response targets, by the module's rule.

    Args:
        input_ids: one row's token ids.
        instruction_ids / response_ids: the token ids of the two parts.
        doc_lengths: lengths of the documents packed into the row (their sum is the row length); None: one document.
    Returns: (bool array, one per token; whether response_part occurs; whether instruction_part occurs).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    target = np.zeros(len(ids), dtype=bool)
    found_response = found_instruction = False
    start = 0
    for length in (doc_lengths if doc_lengths is not None else [len(ids)]):
        doc = ids[start:start + length]
        responses = find_all(doc, response_ids)
        instructions = find_all(doc, instruction_ids)
        found_response |= bool(responses)
        found_instruction |= bool(instructions)
        for r in responses:
            begin = r + len(response_ids)
            end = next((i for i in instructions if i >= begin), len(doc))
            target[start + begin:start + end] = True
        start += length
    return target, found_response, found_instruction


def masked_labels(labels: Sequence[int], target: np.ndarray) -> list[int]:
    """`labels` with IGNORE_INDEX wherever `target` is False (positions already ignored stay ignored)."""
    out = np.asarray(labels, dtype=np.int64).copy()
    out[~target] = IGNORE_INDEX
    return out.tolist()


def never_found_error(name: str, part: str, ids: Sequence[int], where: str):
    """The ConfigError for a part that occurs in no row."""
    return ConfigError(
        f"train_on_responses_only: {name}={part!r} (token ids {list(ids)}) occurs in no row of {where}, so "
        "there would be nothing to train on. Pass the exact text that opens that turn in the tokenized rows (as the "
        "chat template writes it, e.g. '<|im_start|>assistant\\n'), or leave both parts out to derive them from "
        "the tokenizer's chat template."
    )
