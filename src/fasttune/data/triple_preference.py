"""Triple-preference rows for TPO: a prompt, a chosen and a rejected completion, and a gold `reference` completion
(TRL's experimental TPOTrainer's dataset: standard text or conversational, with an explicit or implicit prompt).

Tokenized as data/preference.py tokenizes pairs (the same prompt / completion split, end-of-sequence token and chat
template handling), and collated as TRL's DataCollatorForTriplePreference: 3B right-padded rows, the chosen ones, then
the rejected, then the references (2B rows, no references, when the NLL term is off).
"""
from __future__ import annotations

from typing import Any

from fasttune.data.formats import row_label
from fasttune.data.preference import (_clip_prompt, _Encoder, _finish, _require_columns, _rows_and_columns,
                                      extract_prompt, pad_sequences)
from fasttune.errors import DataError

TRIPLE = ("prompt", "chosen", "rejected", "reference")


def tokenize_triple_rows(rows: Any, tokenizer, *, max_seq_length: int, max_prompt_length: int | None = None,
                         chat_template: str | None = None, source_name: str | None = None) -> list[dict]:
    """Triple-preference rows -> [{"prompt_ids", "chosen_ids", "rejected_ids", "reference_ids"}], each completion cut
    to what max_seq_length leaves after the prompt (cut to its last max_prompt_length tokens first). Without a
    'prompt' column the prompt is what chosen and rejected share (TRL's implicit prompt), and the reference must
    start with it too.

    rows: a list of dicts, a datasets.Dataset or a data file (data/sources.py). Raises DataError naming the row and
    field for a missing column, an implicit prompt the reference does not share, or a bad field."""
    rows, columns, source_name = _rows_and_columns(rows, source_name)
    where = source_name or "the dataset"
    implicit = "prompt" not in columns
    _require_columns(columns, TRIPLE[1:] if implicit else TRIPLE, where, "triple-preference data (TPO)")
    enc = _Encoder(tokenizer, chat_template, where)
    out, dropped = [], 0
    for i, row in enumerate(rows):
        at = row_label(i, source_name)
        prompt, chosen, rejected, reference = (row.get(k) for k in TRIPLE)
        if implicit:
            prompt, chosen, rejected = extract_prompt(chosen, rejected, at)
            if not isinstance(reference, type(prompt)) or reference[:len(prompt)] != prompt:
                raise DataError(f"{at}: there is no 'prompt', so it is taken from what 'chosen' and 'rejected' "
                                f"share, but 'reference' does not start with it. Give the rows a 'prompt' column "
                                f"(and the completions alone in 'chosen', 'rejected' and 'reference').")
            reference = reference[len(prompt):]
        prompt_ids, completions = enc.encode(prompt, [chosen, rejected, reference], at,
                                             ("chosen", "rejected", "reference"), row)
        prompt_ids = _clip_prompt(prompt_ids, max_prompt_length)
        if len(prompt_ids) >= max_seq_length:
            dropped += 1
            continue
        room = max_seq_length - len(prompt_ids)
        out.append({"prompt_ids": prompt_ids, **{f"{side}_ids": ids[:room] for side, ids in
                                                 zip(("chosen", "rejected", "reference"), completions)}})
    enc.name_unused(columns, TRIPLE)
    return _finish(out, dropped, len(rows), where, max_seq_length)


def collate_triples(examples: list[dict], pad_id: int, with_reference: bool = True) -> dict:
    """B triples -> 3B right-padded rows (input_ids, attention_mask, completion_mask, (3B, L) int64): the chosen
    completions, then the rejected, then the references; with_reference=False: the first 2B only."""
    sides = ("chosen", "rejected", "reference") if with_reference else ("chosen", "rejected")
    prompts = [ex["prompt_ids"] for ex in examples] * len(sides)
    completions = [ex[f"{side}_ids"] for side in sides for ex in examples]
    return pad_sequences(prompts, completions, pad_id)
