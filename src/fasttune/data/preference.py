"""Preference rows -> token ids, and their batches (DPO, ORPO: paired; KTO: unpaired).

Paired rows:   {"prompt", "chosen", "rejected"} (+ optional precomputed "ref_chosen_logps", "ref_rejected_logps");
               without "prompt", the prefix chosen and rejected share is the prompt (TRL's implicit prompt)
Unpaired rows: {"prompt", "completion", "label": bool}; KTO also takes paired rows (chosen -> True, rejected -> False)
Reward rows:   paired rows (+ optional "margin"), each side tokenized whole (a reward model scores prompt + completion)

Each text field is a string, or a list of {role, content} messages (TRL's conversational format), rendered with the
chat template: the prompt with the generation prompt, prompt + completion as one conversation. A string next to a
message list becomes a user (prompt) or assistant (completion) message; a row's `tools` / `documents` (a list, or a
JSON string of one) reach the template as its keyword arguments (TRL passes `tools`). As in TRL, plain-text
completions get the
EOS token appended, prompt + completion are tokenized together and the completion starts where that sequence and
the prompt alone stop agreeing; `max_prompt_length` keeps the end of the prompt, `max_seq_length` the start of
prompt + completion.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import datasets
import torch

from fasttune.data import templates
from fasttune.data.formats import message_list, require_dict_rows, require_text, row_label, template_argument
from fasttune.data.sources import load_rows, source_name as _source_name
from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import DataError

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Row columns passed to the chat template of conversational rows as its keyword arguments (TRL passes `tools`).
TEMPLATE_COLUMNS = ("tools", "documents")
logger = logging.getLogger("fasttune.data")


def tokenize_preference_rows(rows: Any, tokenizer, *, max_seq_length: int, max_prompt_length: int | None = None,
                             chat_template: str | None = None, source_name: str | None = None) -> list[dict]:
    """Paired rows -> [{"prompt_ids", "chosen_ids", "rejected_ids"} (+ "ref_chosen_logps", "ref_rejected_logps")]."""
    rows, columns, source_name = _rows_and_columns(rows, source_name)
    where = source_name or "the dataset"
    has_ref = [c for c in REF_COLUMNS if c in columns]
    if len(has_ref) == 1:
        missing = next(c for c in REF_COLUMNS if c not in columns)
        raise DataError(f"{where} has the column '{has_ref[0]}' but not '{missing}'. Precomputed reference "
                        f"log-probs need both columns (or neither, to compute them during training).")
    enc = _Encoder(tokenizer, chat_template, where)
    out, dropped = [], 0
    for at, row, prompt_ids, chosen_ids, rejected_ids in _encoded_pairs(rows, columns, source_name, enc,
                                                                        "paired preference data (DPO, ORPO)"):
        prompt_ids = _clip_prompt(prompt_ids, max_prompt_length)
        if len(prompt_ids) >= max_seq_length:
            dropped += 1
            continue
        room = max_seq_length - len(prompt_ids)
        ex = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:room], "rejected_ids": rejected_ids[:room]}
        for c in has_ref:
            ex[c] = _number(row.get(c), at, c)
        out.append(ex)
    enc.name_unused(columns, (*PAIRED, *has_ref))
    return _finish(out, dropped, len(rows), where, max_seq_length)


def tokenize_reward_rows(rows: Any, tokenizer, *, max_seq_length: int, chat_template: str | None = None,
                         source_name: str | None = None) -> list[dict]:
    """Paired rows (as tokenize_preference_rows reads them, plus an optional numeric "margin") -> [{"chosen_ids",
    "rejected_ids"} (+ "margin")], each the whole prompt + completion as TRL's RewardTrainer tokenizes it (a plain-text
    completion ends in the EOS token; chat rows are one rendered conversation). Rows where either sequence is longer
    than max_seq_length are dropped with one warning, as TRL filters them: a cut row would be scored at a token
    inside it. Raises DataError for missing columns, bad fields (named by row) or no row left."""
    rows, columns, source_name = _rows_and_columns(rows, source_name)
    where = source_name or "the dataset"
    enc = _Encoder(tokenizer, chat_template, where)
    out, dropped = [], 0
    for at, row, prompt_ids, chosen_ids, rejected_ids in _encoded_pairs(rows, columns, source_name, enc,
                                                                        "paired preference data (a reward model)"):
        ex = {"chosen_ids": prompt_ids + chosen_ids, "rejected_ids": prompt_ids + rejected_ids}
        if max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) > max_seq_length:
            dropped += 1
            continue
        if "margin" in columns:
            ex["margin"] = _number(row.get("margin"), at, "margin", "how much the chosen completion should beat "
                                                                   "the rejected one")
        out.append(ex)
    enc.name_unused(columns, (*PAIRED, "margin"))
    if not out:
        raise DataError(f"No example is left in {where}: every row is longer than max_seq_length={max_seq_length} "
                        f"tokens. Raise max_seq_length.")
    if dropped:
        warnings.warn(f"Dropped {dropped} of {len(rows)} rows of {where} longer than max_seq_length="
                      f"{max_seq_length} tokens (a reward model scores a row's last token, so rows are not cut); "
                      f"raise max_seq_length to keep them.", UserWarning, stacklevel=2)
    return out


def tokenize_unpaired_rows(rows: Any, tokenizer, *, max_seq_length: int, max_prompt_length: int | None = None,
                           chat_template: str | None = None, source_name: str | None = None) -> list[dict]:
    """Unpaired rows -> [{"prompt_ids", "completion_ids", "label"}]; paired rows are split into two each."""
    rows, columns, source_name = _rows_and_columns(rows, source_name)
    where = source_name or "the dataset"
    paired = "chosen" in columns and "rejected" in columns and "completion" not in columns
    if not paired:
        _require_columns(columns, UNPAIRED, where, "unpaired preference data (KTO)")
    enc = _Encoder(tokenizer, chat_template, where)
    out, dropped, n = [], 0, 0
    for i, row in enumerate(rows):
        at = row_label(i, source_name)
        if paired:
            fields = ("chosen", "rejected")
            prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
            if "prompt" not in columns:
                prompt, chosen, rejected = extract_prompt(chosen, rejected, at)
            prompt_ids, completions = enc.encode(prompt, [chosen, rejected], at, fields, row)
            labels = [True, False]
        else:
            label = desirable(row, at)
            prompt_ids, completions = enc.encode(row.get("prompt"), [row.get("completion")], at, ("completion",),
                                                 row)
            labels = [label]
        prompt_ids = _clip_prompt(prompt_ids, max_prompt_length)
        for ids, label in zip(completions, labels):
            n += 1
            if len(prompt_ids) >= max_seq_length:
                dropped += 1
                continue
            out.append({"prompt_ids": prompt_ids, "completion_ids": ids[:max_seq_length - len(prompt_ids)],
                        "label": label})
    enc.name_unused(columns, ("prompt", "chosen", "rejected") if paired else UNPAIRED)
    return _finish(out, dropped, n, where, max_seq_length)


def extract_prompt(chosen, rejected, at: str = "A row"):
    """(prompt, chosen, rejected) from rows without a 'prompt' whose chosen and rejected repeat it (TRL's implicit
    prompt, trl.data_utils.extract_prompt): the longest shared prefix of messages (or characters, for strings, a
    space before the split going to the completions). A DataError when nothing is shared."""
    conv = [isinstance(v, (list, tuple)) for v in (chosen, rejected)]
    if conv[0] != conv[1] or not all(isinstance(v, (str, list, tuple)) for v in (chosen, rejected)):
        raise DataError(f"{at}: there is no 'prompt', so it is taken from what 'chosen' and 'rejected' share; that "
                        f"needs both to be message lists or both strings, but they are {type(chosen).__name__} and "
                        f"{type(rejected).__name__}. Give the row a 'prompt'.")
    if conv[0]:  # Arrow fills absent struct keys with None
        chosen, rejected = ([{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m
                             for m in x] for x in (chosen, rejected))
    n = min(len(chosen), len(rejected))
    idx = n - 1  # as TRL's loop leaves it when one is a prefix of the other
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    if idx < 1:
        raise DataError(f"{at}: there is no 'prompt', and 'chosen' and 'rejected' share no leading "
                        f"{'message' if conv[0] else 'text'} to take it from. Give the row a 'prompt' column (and "
                        f"the replies alone in 'chosen' / 'rejected').")
    return chosen[:idx], chosen[idx:], rejected[idx:]


# --- batches ------------------------------------------------------------------------------------------------------
def desirable(row: dict, at: str) -> bool:
    """A KTO row's `label`: True for a desirable completion. Raises DataError naming `at` when it is not a boolean."""
    label = row.get("label")
    if not isinstance(label, bool):
        what = "missing" if label is None else f"{type(label).__name__} {label!r}"
        raise DataError(f"{at}: field 'label' must be true (desirable) or false (undesirable), but it is {what}. "
                        f"Store a boolean in every row.")
    return label


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Right-padded prompt + completion rows: input_ids, attention_mask, completion_mask (1 on completion tokens)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[r, :len(p) + len(c)] = torch.as_tensor(p + c, dtype=torch.long)
        attention_mask[r, :len(p) + len(c)] = 1
        completion_mask[r, len(p):len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """B pairs -> 2B rows, the chosen ones first (one forward for both, as TRL does)."""
    prompts = [ex["prompt_ids"] for ex in examples] * 2
    completions = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    batch = pad_sequences(prompts, completions, pad_id)
    if REF_COLUMNS[0] in examples[0]:
        for c in REF_COLUMNS:
            batch[c] = torch.tensor([ex[c] for ex in examples], dtype=torch.float32)
    return batch


def collate_reward_pairs(examples: list[dict], pad_id: int) -> dict:
    """B reward pairs -> 2B right-padded rows, the chosen ones first (TRL's DataCollatorForPreference): input_ids,
    attention_mask (2B, L) int64, and `margin` (B,) float32 when the examples have one."""
    rows = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    batch = pad_sequences([[] for _ in rows], rows, pad_id)
    del batch["completion_mask"]
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float32)
    return batch


def collate_unpaired(examples: list[dict], pad_id: int) -> dict:
    """B unpaired (KTO) examples -> their right-padded prompt + completion rows (pad_sequences: input_ids,
    attention_mask, completion_mask, (B, L) int64), `label` (B,) bool, True for a desirable completion, and
    `ref_logps` (B,) float32 when the examples carry their precomputed reference log-probs."""
    batch = pad_sequences([ex["prompt_ids"] for ex in examples], [ex["completion_ids"] for ex in examples], pad_id)
    batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    if "ref_logps" in examples[0]:  # precomputed reference log-probs (KTO's precompute_ref_log_probs)
        batch["ref_logps"] = torch.tensor([ex["ref_logps"] for ex in examples], dtype=torch.float32)
    return batch


# --- rows ---------------------------------------------------------------------------------------------------------
def _rows_and_columns(rows, source_name):
    if isinstance(rows, (str, os.PathLike)):
        source_name = source_name or _source_name(rows)
    if not isinstance(rows, (datasets.Dataset, list)):
        rows = load_rows(rows)
    if isinstance(rows, list):
        require_dict_rows(rows, source_name)
        columns = list(dict.fromkeys(k for row in rows for k in row))
    else:
        if len(rows) == 0:
            raise DataError(f"{source_name or 'The dataset'} has no rows. Pass at least one training example.")
        columns = rows.column_names
    return rows, columns, source_name


def _encoded_pairs(rows, columns, source_name, enc, what: str):
    """Yield (row label, row, prompt_ids, chosen_ids, rejected_ids) of paired rows, the prompt taken from the shared
    prefix of chosen and rejected when there is no "prompt" column (TRL's implicit prompt). Raises DataError for
    missing columns (`what` names the data in the message) and bad fields."""
    implicit = "prompt" not in columns and "chosen" in columns and "rejected" in columns
    if not implicit:
        _require_columns(columns, PAIRED, source_name or "the dataset", what)
    for i, row in enumerate(rows):
        at = row_label(i, source_name)
        prompt, chosen, rejected = (row.get(k) for k in PAIRED)
        if implicit:
            prompt, chosen, rejected = extract_prompt(chosen, rejected, at)
        prompt_ids, (chosen_ids, rejected_ids) = enc.encode(prompt, [chosen, rejected], at, ("chosen", "rejected"),
                                                            row)
        yield at, row, prompt_ids, chosen_ids, rejected_ids


def _require_columns(columns, needed, where, what):
    missing = [c for c in needed if c not in columns]
    if missing:
        found = ", ".join(map(repr, columns)) or "none"
        raise DataError(f"{where[0].upper() + where[1:]} has no column {' or '.join(map(repr, missing))}, which "
                        f"{what} needs (columns found: {found}). Give every row {', '.join(map(repr, needed))}.")


def _clip_prompt(ids: list[int], limit: int | None) -> list[int]:
    return ids[-limit:] if limit and len(ids) > limit else ids


def _number(value, where, field, meaning: str = "the reference model's summed log-prob of the completion") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{field}' must be a finite number ({meaning}), but it is {value!r}. Fill it "
                        f"in every row or drop the column.")
    return float(value)


def _finish(out, dropped, n, where, max_seq_length):
    if not out:
        raise DataError(f"No example is left in {where}: every prompt fills max_seq_length={max_seq_length} tokens, "
                        f"leaving no room for the completion. Raise max_seq_length or set max_prompt_length.")
    if dropped:
        warnings.warn(f"Dropped {dropped} of {n} rows of {where} whose prompt alone fills max_seq_length="
                      f"{max_seq_length} tokens; raise max_seq_length or set max_prompt_length to keep them.",
                      UserWarning, stacklevel=3)
    return out


class _Encoder:
    """(prompt, [completion, ...]) of one row -> (prompt_ids, [completion_ids, ...])."""

    def __init__(self, tokenizer, chat_template, where):
        if tokenizer is None:
            raise DataError("A tokenizer is needed to tokenize preference rows; pass the model's tokenizer.")
        self.tok, self.where = tokenizer, where
        self.template = None
        if chat_template is not None:
            templates.check_template_tokens(chat_template, tokenizer)
            self.template = templates.resolve_chat_template(chat_template)
        self.eos = getattr(tokenizer, "eos_token", None)
        self.templated = set()  # TEMPLATE_COLUMNS that some conversational row passed to the template

    def encode(self, prompt, completions, at, fields, row: Mapping):
        """(prompt_ids, [completion_ids, ...]) of one row; `row` gives its `tools` / `documents` for the chat
        template (conversational rows only, as in TRL). Raises DataError naming the row and field."""
        if any(isinstance(v, (list, tuple)) for v in (prompt, *completions)):
            extras = {}
            for name in TEMPLATE_COLUMNS:
                value = template_argument(row.get(name), at, name)
                if value is not None:
                    extras[name] = value
            return self._chat(prompt, completions, at, fields, extras)
        prompt = require_text(prompt, at, "prompt")
        texts = [require_text(c, at, f) for c, f in zip(completions, fields)]
        if self.eos:
            texts = [t if t.endswith(self.eos) else t + self.eos for t in texts]
        prompt_ids = self._ids(prompt)
        return self._split(prompt_ids, [self._ids(prompt + t) for t in texts], at, fields)

    def name_unused(self, columns, used):
        """One log line naming the columns that reached no token: those the layout does not read, and `tools` /
        `documents` that no conversational row passed to a template that mentions them."""
        template = str(self.template or getattr(self.tok, "chat_template", None) or "")
        unused = [repr(c) for c in columns if c not in used and c not in TEMPLATE_COLUMNS]
        unused += [f"{c!r} ({'the chat template does not use it' if c not in template else 'only chat rows use it'})"
                   for c in TEMPLATE_COLUMNS if c in columns and not (c in self.templated and c in template)]
        if unused:
            logger.warning("Columns of %s not used for preference rows: %s.", self.where, ", ".join(unused))

    def _chat(self, prompt, completions, at, fields, extras):
        if not (self.template or getattr(self.tok, "chat_template", None)):
            raise DataError(f"{at} holds chat messages, but the tokenizer has no chat template to render them. Set "
                            f"chat_template (--chat-template) to one of {templates.names()} or to a Jinja string.")
        prompt_msgs = message_list(prompt, at, "prompt", "user")
        self.templated.update(extras)
        prompt_ids = self._render(prompt_msgs, at, extras, add_generation_prompt=True)
        full = []
        for value, field in zip(completions, fields):
            msgs = message_list(value, at, field, "assistant")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{at}: field '{field}' has no assistant message, so there is nothing to score. "
                                f"Give it the assistant's reply, e.g. [{{'role': 'assistant', 'content': ...}}].")
            full.append(self._render(prompt_msgs + msgs, at, extras))
        return self._split(prompt_ids, full, at, fields)

    def _split(self, prompt_ids, full, at, fields):
        # The completion starts where prompt and prompt + completion stop agreeing (tokens may merge across the
        # boundary, and some templates render a prompt alone differently), as in TRL.
        n = min(_common_prefix(prompt_ids, ids) for ids in full)
        completions = [ids[n:] for ids in full]
        for ids, field in zip(completions, fields):
            if not ids:
                raise DataError(f"{at}: field '{field}' gives no tokens after the prompt. Give it some text.")
        return prompt_ids[:n], completions

    def _ids(self, text: str) -> list[int]:
        from fasttune.data.encode import without_second_bos

        ids = list(text_tokenizer(self.tok)(text)["input_ids"])
        once = without_second_bos(self.tok, text, ids)  # a prompt already rendered with the template has its BOS
        if len(once) < len(ids) and not getattr(self, "_said_bos", False):
            self._said_bos = True
            warnings.warn(f"Prompts of {self.where} already start with the BOS token {self.tok.bos_token!r} (rendered "
                          f"with the chat template): no second BOS was added.", UserWarning, stacklevel=2)
        return once

    def _render(self, messages, at, extras, add_generation_prompt=False) -> list[int]:
        text = templates.render_chat(self.tok, messages, at, add_generation_prompt=add_generation_prompt,
                                     chat_template=self.template, **extras)
        return list(text_tokenizer(self.tok)(text, add_special_tokens=False)["input_ids"])  # templates carry their own BOS


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
