"""Per-row SFT encoding: one row of a known layout -> (input_ids, labels), and the batch function for
`datasets.Dataset.map`.

EOS: text and prompt-completion examples get `tokenizer.eos_token_id` appended (so the model learns to stop);
chat examples end with whatever the chat template emits at the end of a turn; tokenized rows are untouched.
Response-only masking for chat data is derived from the template itself: for assistant message i, the target
span runs from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i+1]), for every assistant turn.

`SFTEncoder` is a plain picklable object: `datasets` pickles it to worker processes (num_proc > 1) and hashes
it with dill to fingerprint the cached result, so every setting that changes the output lives in its state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

from fasttune.constants import IGNORE_INDEX
from fasttune.data import formats, templates
from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import DataError

# Bit flags of the `fate` column: what happened to a row. A truncated row can also be left without targets, or
# (training on all tokens) without any token of its response: it then teaches only its prompt. BOS_IN_TEXT: the
# text already starts with the BOS token (rendered with a chat template), so the tokenizer's own BOS was not added.
TRUNCATED, NO_TARGET, TOO_LONG, NO_RESPONSE, BOS_IN_TEXT = 1, 2, 4, 8, 16
# Row columns passed to the chat template as its keyword arguments (as TRL passes `tools`).
TEMPLATE_COLUMNS = ("tools", "documents")
INT32_MAX = 2**31 - 1  # token ids are stored as int32 in the Arrow cache


def without_second_bos(tokenizer, text: str, ids: list[int]) -> list[int]:
    """`ids` (`text` tokenized with special tokens) without the BOS the tokenizer added when `text` already starts
    with the BOS token, as text rendered with a chat template does: one BOS, as apply_chat_template(tokenize=True)
    gives. (TRL 1.16 tokenizes such text with both.)"""
    bos_id, bos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos_id is None or not bos or not text.startswith(bos):
        return ids
    in_text = _leading(text, bos)  # BOS pieces the text itself starts with
    in_ids = next((i for i, t in enumerate(ids) if t != bos_id), len(ids))
    return ids[1:] if in_ids == in_text + 1 else ids


def _leading(text: str, piece: str) -> int:
    n = 0
    while text.startswith(piece, n * len(piece)):
        n += 1
    return n


def _code_version() -> str:
    """Hash of the code that decides the tokens: dill pickles classes by name, so a fix here must change the
    fingerprint by itself, or an old cache would be reused after an upgrade."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("encode.py", "formats.py", "templates.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()


class SFTEncoder:
    """Encodes rows of one layout. `encode(row, index)` -> (input_ids, labels), untruncated;
    `encoder(batch, indices)` (the `datasets.Dataset.map` function, batched) -> truncated columns + `fate`."""

    def __init__(self, tokenizer, fmt: str, text_field: str = "text", responses_only: bool = False,
                 source_name: str | None = None, chat_template: str | None = None, *, max_seq_length: int = 2048,
                 drop_long: bool = False, completion_only: bool | None = None):
        self.tok = tokenizer
        self.fmt = fmt
        self.text_field = text_field
        self.responses_only = responses_only
        # prompt/completion rows: the loss on the completion only unless completion_only is False (TRL's
        # completion_only_loss, whose default None means True for these rows)
        self.completion_only = completion_only is not False or responses_only
        self.source_name = source_name
        self.max_seq_length = max_seq_length
        self.drop_long = drop_long
        self.code_version = CODE_VERSION
        self.eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.template = None  # None: the tokenizer's own
        if chat_template is not None and fmt in ("messages", "sharegpt", "alpaca", "prompt-completion"):
            templates.check_template_tokens(chat_template, tokenizer)
            self.template = templates.resolve_chat_template(chat_template)
        self.has_template = self.template is not None or (
            bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
        )
        self._offsets_ok = bool(getattr(tokenizer, "is_fast", False))
        self.bos_text = _added_bos(tokenizer) if fmt in ("text", "prompt-completion") else None

        if tokenizer is None and fmt != "tokenized":
            raise DataError(f"A tokenizer is needed to tokenize '{fmt}' rows; pass the model's tokenizer.")
        if fmt in ("messages", "sharegpt") and not self.has_template:
            raise DataError(
                f"{source_name or 'The dataset'} holds chat conversations ('{fmt}' layout), but the tokenizer has "
                "no chat template to render them. Set chat_template (--chat-template) to one of the built-in "
                f"templates ({templates.names()}) or to a Jinja string, use a tokenizer that has one "
                "(e.g. the -Instruct variant of the model), or convert the rows to 'text'."
            )
        # A method name, not a bound method: keeps the pickled state (and so the cache fingerprint) plain.
        self._layout = {
            "text": "_text",
            "messages": "_messages",
            "sharegpt": "_sharegpt",
            "alpaca": "_alpaca",
            "prompt-completion": "_prompt_completion",
            "tokenized": "_tokenized",
        }[fmt]

    def encode(self, row: Mapping, index: int) -> tuple[list[int], list[int]]:
        """Row `index` -> (input_ids, labels) of equal length, untruncated; labels are the ids, with -100 (IGNORE_INDEX)
        on prompt tokens when responses_only (and wherever a tokenized row's labels say so). Raises DataError, naming
        the row, for a row that does not fit the layout (missing or non-text fields, invalid messages, token ids outside
        the vocabulary, labels of another length)."""
        return getattr(self, self._layout)(row, formats.row_label(index, self.source_name))

    def fit(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int], int]:
        """Apply max_seq_length: -> (input_ids, labels, fate flags); dropped rows come back empty."""
        fate = 0
        if len(input_ids) > self.max_seq_length:
            if self.drop_long:
                return [], [], TOO_LONG
            fate = TRUNCATED
            input_ids, labels = input_ids[: self.max_seq_length], labels[: self.max_seq_length]
        # Position t predicts token t+1, so labels[0] never counts as a target.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return [], [], fate | NO_TARGET
        return input_ids, labels, fate

    def fit_row(self, row: Mapping, index: int) -> tuple[list[int], list[int], int]:
        """encode + fit; a truncated row whose response starts past max_seq_length also gets NO_RESPONSE."""
        ids, labels, fate = self.fit(*self.encode(row, index))
        if fate == TRUNCATED and not self.responses_only:
            start = self.response_start(row, index)
            if start is not None and start >= self.max_seq_length:
                fate |= NO_RESPONSE
        if self.bos_text is not None:
            first = row.get(self.text_field if self._layout == "_text" else "prompt")
            if isinstance(first, str) and first.startswith(self.bos_text):
                fate |= BOS_IN_TEXT
        return ids, labels, fate

    def template_reads(self, name: str) -> bool:
        """Whether the chat template mentions `name` (e.g. 'tools'): a template that does not ignores it."""
        template = self.template if self.template is not None else getattr(self.tok, "chat_template", None)
        return name in str(template or "")

    def response_start(self, row: Mapping, index: int) -> int | None:
        """Token index where the row's first response (assistant turn, completion, alpaca output) begins; None
        for layouts without one (text, tokenized)."""
        where = formats.row_label(index, self.source_name)
        if self._layout == "_prompt_completion":
            return len(self._text_ids(formats.require_text(row.get("prompt"), where, "prompt")))
        if self._layout == "_alpaca" and not self.has_template:
            instruction, extra, _ = formats.alpaca_fields(row, where)
            return len(self._text_ids(formats.alpaca_prompt(instruction, extra)))
        if self._layout in ("_messages", "_sharegpt", "_alpaca"):
            messages = self._conversation(row, where)
            first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
            if first is None:
                return None
            extras = self._template_kwargs(row, where) if self._layout != "_alpaca" else None
            prompt = self._render(messages[:first], where, add_generation_prompt=True, extras=extras)
            return len(self._ids(prompt, add_special_tokens=False))
        return None

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        out = {"input_ids": [], "labels": [], "fate": []}
        columns = list(batch)
        for j, index in enumerate(indices):
            ids, labels, fate = self.fit_row({c: batch[c][j] for c in columns}, index)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["fate"].append(fate)
        return out

    # -- layouts ---------------------------------------------------------------------------------------

    def _text(self, row, where):
        text = formats.require_text(row.get(self.text_field), where, self.text_field)
        ids = self._text_ids(text)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids, list(ids)

    def _prompt_completion(self, row, where):
        if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
            return self._chat_prompt_completion(row, where)
        prompt = formats.require_text(row.get("prompt"), where, "prompt")
        completion = formats.require_text(row.get("completion"), where, "completion")
        return self._join(prompt, completion, self.completion_only)

    def _chat_prompt_completion(self, row, where):
        """Conversational prompt / completion rows (message lists), as TRL's SFTTrainer tokenizes them: the chat
        template's rendering of prompt + completion; the completion starts where it and the prompt's rendering with
        the generation prompt diverge."""
        if not self.has_template:
            raise DataError(f"{where}: 'prompt' and 'completion' are chat messages, but the tokenizer has no chat "
                            f"template to render them. Set chat_template (--chat-template) to one of "
                            f"{templates.names()}, or store them as text.")
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(f"{where}: one of 'prompt' and 'completion' is a list of chat messages and the other is "
                            f"not; give both as message lists (conversational) or both as text.")
        both = formats.validate_messages(prompt + completion, where, "prompt + completion")
        prompt, completion = both[:len(prompt)], both[len(prompt):]
        extras = self._template_kwargs(row, where)
        prompt_ids = self._ids(self._render(prompt, where, add_generation_prompt=True, extras=extras),
                               add_special_tokens=False)
        ids = self._ids(self._render(prompt + completion, where, extras=extras), add_special_tokens=False)
        n = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        return ids, ([IGNORE_INDEX] * n + ids[n:] if self.completion_only else list(ids))

    def _alpaca(self, row, where):
        if self.has_template:
            return self._chat(formats.alpaca_to_messages(row, where), where)
        instruction, extra, output = formats.alpaca_fields(row, where)
        return self._join(formats.alpaca_prompt(instruction, extra), output)

    def _messages(self, row, where):
        return self._chat(self._conversation(row, where), where, self._template_kwargs(row, where))

    _sharegpt = _messages

    def _conversation(self, row, where) -> list[dict]:
        """The row as validated chat messages (messages, sharegpt and, with a template, alpaca layouts)."""
        if self._layout == "_sharegpt":
            return formats.sharegpt_to_messages(row.get("conversations"), where)
        if self._layout == "_alpaca":
            return formats.alpaca_to_messages(row, where)
        return formats.validate_messages(row.get("messages"), where)

    def _tokenized(self, row, where):
        input_ids = _int_list(row.get("input_ids"), where, "input_ids")
        if not input_ids:
            raise DataError(f"{where}: field 'input_ids' is empty. Remove the row or give it tokens.")
        vocab = len(self.tok) if self.tok is not None else None
        bad = next((t for t in input_ids if t < 0 or t >= (INT32_MAX if vocab is None else vocab)), None)
        if bad is not None:
            what = "the tokenizer's vocabulary" if vocab is not None else "the range of token ids"
            raise DataError(
                f"{where}: 'input_ids' holds the token id {bad}, outside {what} "
                f"(0..{(vocab or INT32_MAX + 1) - 1}). Tokenize the data with this model's tokenizer."
            )
        labels = row.get("labels")
        if labels is None:
            return input_ids, list(input_ids)
        labels = _int_list(labels, where, "labels")
        if any(abs(v) > INT32_MAX for v in labels):
            raise DataError(f"{where}: 'labels' holds a value outside the int32 range; use token ids or -100.")
        if len(labels) != len(input_ids):
            raise DataError(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(input_ids)}. "
                "They must have the same length (use -100 for positions without loss)."
            )
        return input_ids, labels

    # -- helpers ---------------------------------------------------------------------------------------

    def _ids(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(text_tokenizer(self.tok)(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _text_ids(self, text: str) -> list[int]:
        """`text` with the tokenizer's special tokens, and one BOS when the text already starts with it."""
        return without_second_bos(self.tok, text, self._ids(text, add_special_tokens=True))

    def _template_kwargs(self, row: Mapping, where: str) -> dict:
        """The row's `tools` / `documents` (a list, or a JSON string of one) for the chat template, as TRL
        passes `tools`."""
        out = {}
        for name in TEMPLATE_COLUMNS:
            value = formats.template_argument(row.get(name), where, name)
            if value is not None:
                out[name] = value
        return out

    def _join(self, prompt: str, completion: str, mask_prompt: bool | None = None):
        """prompt + completion (+ EOS) ids, and labels with the prompt masked when mask_prompt (default:
        train_on_responses_only)."""
        prompt_ids = self._text_ids(prompt)
        completion_ids = self._ids(completion, add_special_tokens=False)
        if self.eos is not None:
            completion_ids.append(self.eos)
        masked = self.responses_only if mask_prompt is None else mask_prompt
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if masked else list(prompt_ids)
        return prompt_ids + completion_ids, prompt_labels + completion_ids

    def _render(self, messages: list[dict], where: str, *, add_generation_prompt: bool = False,
                extras: dict | None = None) -> str:
        return templates.render_chat(self.tok, messages, where, add_generation_prompt=add_generation_prompt,
                                     chat_template=self.template, **(extras or {}))

    def _chat(self, messages: list[dict], where: str, extras: dict | None = None):
        full = self._render(messages, where, extras=extras)
        if not self.responses_only:
            ids = self._ids(full, add_special_tokens=False)  # templates already include BOS
            return ids, list(ids)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._render(messages[:i], where, add_generation_prompt=True, extras=extras)
            end = self._render(messages[: i + 1], where, extras=extras)
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
                enc = text_tokenizer(self.tok)(text, add_special_tokens=False, return_offsets_mapping=True)
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


def _added_bos(tokenizer) -> str | None:
    """The BOS token's text if the tokenizer puts BOS in front of text by itself (add_special_tokens=True)."""
    bos_id, bos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if tokenizer is None or bos_id is None or not bos:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # an unusual tokenizer: no detection, nothing dropped by without_second_bos either way
        return None
    return bos if list(ids[:1]) == [bos_id] else None


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
