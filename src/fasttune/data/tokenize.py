"""Rows -> tokenized SFT examples: {"input_ids": [...], "labels": [...]} with -100 where there is no loss.

EOS: text and prompt-completion examples get `tokenizer.eos_token_id` appended (so the model learns to stop);
chat examples end with whatever the chat template emits at the end of a turn; tokenized rows are untouched.
Response-only masking for chat data is derived from the template itself: for assistant message i, the target
span runs from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i+1]), for every assistant turn.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any, Callable

import datasets
from tqdm.auto import tqdm

from fasttune.errors import ConfigError, DataError
from fasttune.data import formats, templates
from fasttune.data.sources import load_rows, source_name as _source_name

IGNORE_INDEX = -100
PROGRESS_MIN_ROWS = 1000

logger = logging.getLogger("fasttune.data")


def tokenize_rows(
    rows: Any,
    tokenizer: Any,
    *,
    max_seq_length: int,
    data_format: str = "auto",
    dataset_text_field: str = "text",
    train_on_responses_only: bool = False,
    source_name: str | None = None,
    chat_template: str | None = None,
    drop_long: bool = False,
) -> list[dict[str, list[int]]]:
    """Tokenize every row; return examples with equal-length `input_ids` and `labels`.

    `rows` is a datasets.Dataset, a list of dicts, or anything `load_rows` accepts (a path names itself in
    error messages; otherwise pass `source_name`). Examples are truncated to `max_seq_length`; examples left
    without any target token (after the causal shift) are dropped with one warning. `drop_long=True` drops
    examples longer than `max_seq_length` instead of truncating them (counted, one warning).
    `chat_template` (a name from fasttune.data.templates.CHAT_TEMPLATES or a Jinja string) renders chat rows
    instead of the tokenizer's own template.
    """
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}.")
    if isinstance(rows, (str, os.PathLike)):
        source_name = source_name or _source_name(rows)
    if not isinstance(rows, (datasets.Dataset, list)):
        rows = load_rows(rows)
    if isinstance(rows, list):
        formats.require_dict_rows(rows, source_name)
        columns = list(dict.fromkeys(k for row in rows for k in row))
    else:
        if len(rows) == 0:
            raise DataError(f"{source_name or 'The dataset'} has no rows. Pass at least one training example.")
        columns = rows.column_names

    fmt = formats.detect_format(
        columns, data_format, dataset_text_field=dataset_text_field, source_name=source_name
    )
    if isinstance(rows, datasets.Dataset):  # read only the columns the layout uses
        keep = formats.required_columns(fmt, dataset_text_field) + formats.OPTIONAL_COLUMNS.get(fmt, ())
        rows = rows.select_columns([c for c in keep if c in columns])

    encode = _Encoder(tokenizer, fmt, dataset_text_field, train_on_responses_only, source_name, chat_template)
    examples, dropped, truncated, too_long = [], 0, 0, 0
    n = len(rows)
    bar = tqdm(rows, total=n, desc="Tokenizing", unit="row", disable=n <= PROGRESS_MIN_ROWS)
    for i, row in enumerate(bar):
        input_ids, labels = encode(row, i)
        if len(input_ids) > max_seq_length:
            if drop_long:
                too_long += 1
                continue
            truncated += 1
            input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
        # Position t predicts token t+1, so labels[0] never counts as a target.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})

    where = source_name or "the dataset"
    if truncated:
        logger.warning(
            "%d of %d rows of %s are longer than max_seq_length=%d tokens and were truncated.",
            truncated, n, where, max_seq_length,
        )
    if not examples and too_long == n:
        raise DataError(
            f"No training example is left in {where}: all {n} rows are longer than max_seq_length="
            f"{max_seq_length} tokens and drop_long is on. Raise max_seq_length, or turn drop_long off to "
            "truncate them."
        )
    if not examples:
        raise DataError(
            f"No usable training example is left in {where}: all {n} rows have no target token"
            f" after truncation to max_seq_length={max_seq_length}"
            + (" with train_on_responses_only (the prompts fill the whole window)" if train_on_responses_only else "")
            + ". Raise max_seq_length, shorten the prompts, or check that rows contain responses."
        )
    if too_long:
        warnings.warn(
            f"Dropped {too_long} of {n} rows of {where} that are longer than max_seq_length={max_seq_length} "
            "tokens (drop_long); turn drop_long off to truncate them instead.",
            UserWarning,
            stacklevel=2,
        )
    if dropped:
        warnings.warn(
            f"Dropped {dropped} of {n} rows of {where} that have no target token after truncation to "
            f"max_seq_length={max_seq_length}; raise max_seq_length to keep them.",
            UserWarning,
            stacklevel=2,
        )
    return examples


class _Encoder:
    """Per-row encoding for one layout; call it with (row, index) -> (input_ids, labels)."""

    def __init__(self, tokenizer, fmt: str, text_field: str, responses_only: bool, source_name: str | None,
                 chat_template: str | None = None):
        self.tok = tokenizer
        self.fmt = fmt
        self.text_field = text_field
        self.responses_only = responses_only
        self.source_name = source_name
        self.eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.template = None  # None: the tokenizer's own
        if chat_template is not None and fmt in ("messages", "sharegpt", "alpaca"):
            templates.check_template_tokens(chat_template, tokenizer)
            self.template = templates.resolve_chat_template(chat_template)
        self.has_template = self.template is not None or (
            bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
        )
        self._offsets_ok = bool(getattr(tokenizer, "is_fast", False))

        if tokenizer is None and fmt != "tokenized":
            raise DataError(f"A tokenizer is needed to tokenize '{fmt}' rows; pass the model's tokenizer.")
        if fmt in ("messages", "sharegpt") and not self.has_template:
            raise DataError(
                f"{source_name or 'The dataset'} holds chat conversations ('{fmt}' layout), but the tokenizer has "
                "no chat template to render them. Set chat_template (--chat-template) to one of the built-in "
                f"templates ({templates.names()}) or to a Jinja template string, use a tokenizer that has one "
                "(e.g. the -Instruct variant of the model), or convert the rows to 'text'."
            )
        self._encode: Callable[[Mapping, str], tuple[list[int], list[int]]] = {
            "text": self._text,
            "messages": self._messages,
            "sharegpt": self._sharegpt,
            "alpaca": self._alpaca,
            "prompt-completion": self._prompt_completion,
            "tokenized": self._tokenized,
        }[fmt]

    def __call__(self, row: Mapping, index: int) -> tuple[list[int], list[int]]:
        return self._encode(row, formats.row_label(index, self.source_name))

    # -- layouts ---------------------------------------------------------------------------------------

    def _text(self, row, where):
        text = formats.require_text(row.get(self.text_field), where, self.text_field)
        ids = self._ids(text, add_special_tokens=True)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids, list(ids)

    def _prompt_completion(self, row, where):
        prompt = formats.require_text(row.get("prompt"), where, "prompt")
        completion = formats.require_text(row.get("completion"), where, "completion")
        return self._join(prompt, completion)

    def _alpaca(self, row, where):
        if self.has_template:
            return self._chat(formats.alpaca_to_messages(row, where), where)
        instruction, extra, output = formats.alpaca_fields(row, where)
        return self._join(formats.alpaca_prompt(instruction, extra), output)

    def _messages(self, row, where):
        return self._chat(formats.validate_messages(row.get("messages"), where), where)

    def _sharegpt(self, row, where):
        return self._chat(formats.sharegpt_to_messages(row.get("conversations"), where), where)

    def _tokenized(self, row, where):
        input_ids = _int_list(row.get("input_ids"), where, "input_ids")
        if not input_ids:
            raise DataError(f"{where}: field 'input_ids' is empty. Remove the row or give it tokens.")
        vocab = len(self.tok) if self.tok is not None else None
        bad = next((t for t in input_ids if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise DataError(
                f"{where}: 'input_ids' holds the token id {bad}, outside the tokenizer's vocabulary "
                f"(0..{(vocab or 0) - 1}). Tokenize the data with this model's tokenizer."
            )
        labels = row.get("labels")
        if labels is None:
            return input_ids, list(input_ids)
        labels = _int_list(labels, where, "labels")
        if len(labels) != len(input_ids):
            raise DataError(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(input_ids)}. "
                "They must have the same length (use -100 for positions without loss)."
            )
        return input_ids, labels

    # -- helpers ---------------------------------------------------------------------------------------

    def _ids(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _join(self, prompt: str, completion: str):
        prompt_ids = self._ids(prompt, add_special_tokens=True)
        completion_ids = self._ids(completion, add_special_tokens=False)
        if self.eos is not None:
            completion_ids.append(self.eos)
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if self.responses_only else list(prompt_ids)
        return prompt_ids + completion_ids, prompt_labels + completion_ids

    def _render(self, messages: list[dict], where: str, *, add_generation_prompt: bool = False) -> str:
        try:
            text = self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
            )
        except Exception as e:  # jinja raises TemplateError (incl. raise_exception in templates) and others
            raise DataError(
                f"{where}: the tokenizer's chat template could not render this conversation "
                f"({type(e).__name__}: {e}). Check the roles and their order (many templates need "
                "user/assistant turns to alternate)."
            ) from e
        if not isinstance(text, str):
            raise DataError(f"{where}: the chat template returned {type(text).__name__}, expected a string.")
        return text

    def _chat(self, messages: list[dict], where: str):
        full = self._render(messages, where)
        if not self.responses_only:
            ids = self._ids(full, add_special_tokens=False)  # templates already include BOS
            return ids, list(ids)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._render(messages[:i], where, add_generation_prompt=True)
            end = self._render(messages[: i + 1], where)
            if not (end.startswith(start) and full.startswith(end)):
                raise DataError(
                    f"{where}: train_on_responses_only cannot find assistant turn {i} because the chat template "
                    "is not prefix-stable (rendering the conversation up to that turn is not a prefix of "
                    "rendering the whole conversation; some templates rewrite earlier turns, e.g. drop "
                    "reasoning). Use a template without that behaviour or train with "
                    "train_on_responses_only=False."
                )
            spans.append((len(start), len(end)))
        return self._mask_spans(full, spans)

    def _mask_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Tokenize `text`; label tokens that overlap a target char span, mask the rest."""
        if self._offsets_ok:
            try:
                enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError:  # slow tokenizers cannot report offsets
                self._offsets_ok = False
            else:
                ids = list(enc["input_ids"])
                mark = bytearray(len(text))
                for s, e in spans:
                    mark[s:e] = b"\x01" * (e - s)
                covered = list(accumulate(mark, initial=0))  # covered[k] = target chars in text[:k]
                labels = []
                for tok_id, (a, b) in zip(ids, enc["offset_mapping"]):
                    # A token straddling a span edge (e.g. "\nThe") counts: it produces target text.
                    hit = covered[b] > covered[a] if b > a else (a < len(text) and mark[a] == 1)
                    labels.append(tok_id if hit else IGNORE_INDEX)
                return ids, labels
        # Fallback: token counts of the prefixes (exact when tokenization does not merge across boundaries).
        ids = self._ids(text, add_special_tokens=False)
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            lo = len(self._ids(text[:s], add_special_tokens=False))
            hi = len(self._ids(text[:e], add_special_tokens=False))
            labels[lo:hi] = ids[lo:hi]
        return ids, labels


def _int_list(value: Any, where: str, field: str) -> list[int]:
    if hasattr(value, "tolist"):  # numpy arrays / torch tensors
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise DataError(
            f"{where}: field '{field}' must be a list of integers, but it is a {type(value).__name__}."
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise DataError(
                f"{where}: field '{field}' must hold only integers, but it contains {v!r}."
            )
        out.append(v)
    return out
