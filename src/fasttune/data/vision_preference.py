"""Preference rows with images for a vision-language model (DPO's pairs, KTO's unpaired rows) -> token ids and image
sources, and their batches.

As TRL 1.16's DPOTrainer reads a vision dataset: a row holds `images` (a list; or one `image`), a `prompt` of chat
messages whose {"type": "image"} items take those images in order (inline {"type": "image", "image": PATH} items
work too; a prompt without image items gets them before its first user text, as TRL places them: see
data/vision_prompts.py), and `chosen` / `rejected` assistant messages. The prompt is rendered by the chat template
with the generation prompt, and each completion is what rendering prompt + completion adds after it (TRL's
apply_chat_template); the prompt's tokens have each image placeholder expanded to its image's tokens (the processor's
own count), the completions are tokenized alone, without special tokens, as TRL's DataCollatorForVisionPreference
tokenizes them. Precomputed `ref_chosen_logps` / `ref_rejected_logps` columns are kept, as for text rows. A batch
repeats each pair's images for its chosen and its rejected row. KTO's rows hold one `completion` and a boolean
`label` instead of the pair (TRL's DataCollatorForVisionUnpairedPreference).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from fasttune.data.preference import (REF_COLUMNS, _number, _rows_and_columns, collate_pairs, collate_unpaired,
                                     desirable)
from fasttune.data.vision import _split_media
from fasttune.data.vision_prompts import VisionPrompt, encode_vision_prompt, prompt_media, row_images
from fasttune.errors import DataError

VISION_PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
VISION_UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def _assistant_messages(value: Any, key: str, where: str) -> list[dict]:
    """A completion field (assistant messages, or a string for one) with its items normalised; images refused."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a list of chat messages (or a string).")
    messages, images, _, _ = _split_media(value, None, where)
    if images:
        raise DataError(f"{where}: images go in the prompt; '{key}' holds the assistant's text.")
    return messages


def _completion_ids(processor, prompt: VisionPrompt, messages: list[dict], key: str, where: str) -> list[int]:
    """What rendering prompt + completion adds after the prompt, tokenized alone (TRL's vision collators)."""
    whole = processor.apply_chat_template(prompt.messages + messages)
    if not whole.startswith(prompt.text):
        raise DataError(f"{where}: the chat template renders prompt + '{key}' with a different start than the "
                        f"prompt alone, so the completion cannot be told from it.")
    return processor.tokenizer(whole[len(prompt.text):], add_special_tokens=False)["input_ids"]


def _vision_rows(rows, source_name, base_dir, required, what: str):
    """(rows, columns, source name, base dir) with the required columns checked (`required(columns)` -> the
    tuple); a data file's images are relative to its folder."""
    if base_dir is None and isinstance(rows, (str, os.PathLike)):
        base_dir = Path(rows).expanduser().resolve().parent
    rows, columns, source_name = _rows_and_columns(rows, source_name)
    needed = required(columns)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source_name or 'The dataset'} has no column {' or '.join(map(repr, missing))}; a "
                        f"vision-language model's {what} need {', '.join(map(repr, needed))} (and 'images' for "
                        f"the prompt's image items).")
    return rows, columns, source_name, base_dir


def _paired(columns) -> bool:
    return "chosen" in columns and "rejected" in columns and "completion" not in columns


def _kept(out: list, dropped: int, total: int, source_name, max_seq_length: int) -> list:
    if not out:
        raise DataError(f"No example is left in {source_name or 'the dataset'}: every prompt with its images fills "
                        f"max_seq_length={max_seq_length} tokens. Raise max_seq_length or use smaller images.")
    if dropped:
        warnings.warn(f"Dropped {dropped} of {total} rows whose prompt with its images fills max_seq_length="
                      f"{max_seq_length} tokens (a cut inside the prompt would split its images).", UserWarning,
                      stacklevel=3)
    return out


def tokenize_vision_preference_rows(rows: Any, processor, *, max_seq_length: int, source_name: str | None = None,
                                    base_dir: Path | None = None) -> list[dict]:
    """Rows (list, datasets.Dataset or file path) -> [{"prompt_ids", "chosen_ids", "rejected_ids", "images"}]
    (images as their sources, decoded again at collate time) for `processor` (a VisionProcessor); image paths are
    relative to `base_dir`, else to the data file's folder when `rows` is a path. A pair longer than
    max_seq_length keeps its start (TRL's truncation); one whose prompt with its images alone fills it is dropped
    (a cut would split an image), with one warning. Raises DataError naming the row for missing columns, messages
    that are not lists, an image item without its image, more images than the prompt's image items, images in a
    completion, audio items, video items on a family that takes none, or an unreadable image or video."""
    rows, columns, source_name, base_dir = _vision_rows(rows, source_name, base_dir,
                                                        lambda _: VISION_PREFERENCE_COLUMNS, "preference rows")
    refs = [c for c in REF_COLUMNS if c in columns]
    if len(refs) == 1:
        raise DataError(f"{source_name or 'The dataset'} has the column '{refs[0]}' but not its pair; precomputed "
                        f"reference log-probs need both {REF_COLUMNS} (or neither).")
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"Row {i}" + (f" of {source_name}" if source_name else "")
        fields = {key: _assistant_messages(row.get(key), key, where) for key in ("chosen", "rejected")}
        prompt = encode_vision_prompt(row.get("prompt"), row_images(row), processor, where, base_dir,
                                      video_column=row.get("videos"))
        completions = [_completion_ids(processor, prompt, fields[key], key, where) for key in ("chosen", "rejected")]
        if len(prompt.ids) >= max_seq_length:
            dropped += 1
            continue
        room = max_seq_length - len(prompt.ids)
        ex = {"prompt_ids": prompt.ids, "chosen_ids": completions[0][:room], "rejected_ids": completions[1][:room],
              "images": prompt.sources, "videos": prompt.videos}
        for c in refs:  # precomputed reference log-probs, as for text rows
            ex[c] = _number(row.get(c), where, c)
        out.append(ex)
    return _kept(out, dropped, len(rows), source_name, max_seq_length)


def tokenize_vision_unpaired_rows(rows: Any, processor, *, max_seq_length: int, source_name: str | None = None,
                                  base_dir: Path | None = None) -> list[dict]:
    """KTO's rows with images -> [{"prompt_ids", "completion_ids", "label", "images"}], as TRL 1.16's
    DataCollatorForVisionUnpairedPreference lays them out: the prompt (with its images) as for DPO, a `completion`
    of assistant messages tokenized alone, a boolean `label` (True: desirable). Paired rows (prompt, chosen,
    rejected) are split into a desirable and an undesirable row, as for text (TRL refuses them with images).
    Truncation, dropping and errors as tokenize_vision_preference_rows; a label that is not a boolean is named."""
    rows, columns, source_name, base_dir = _vision_rows(
        rows, source_name, base_dir, lambda c: VISION_PREFERENCE_COLUMNS if _paired(c) else VISION_UNPAIRED_COLUMNS,
        "unpaired preference rows (KTO)")
    paired = _paired(columns)
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"Row {i}" + (f" of {source_name}" if source_name else "")
        if paired:
            fields = [("chosen", True), ("rejected", False)]
        else:
            fields = [("completion", desirable(row, where))]
        prompt = encode_vision_prompt(row.get("prompt"), row_images(row), processor, where, base_dir,
                                      video_column=row.get("videos"))
        if len(prompt.ids) >= max_seq_length:
            dropped += len(fields)
            continue
        room = max_seq_length - len(prompt.ids)
        for key, label in fields:
            ids = _completion_ids(processor, prompt, _assistant_messages(row.get(key), key, where), key, where)
            out.append({"prompt_ids": prompt.ids, "completion_ids": ids[:room], "label": label,
                        "images": prompt.sources, "videos": prompt.videos})
    return _kept(out, dropped, len(rows), source_name, max_seq_length)


def collate_vision_pairs(examples: list[dict], processor) -> dict:
    """B pairs -> 2B right-padded rows, chosen first (collate_pairs), with each pair's images repeated for its
    chosen and its rejected row: pixel_values / image_grid_thw (or the family's image keys) in row order."""
    return {**collate_pairs(examples, processor.pad_id()), **prompt_media(examples * 2, processor)}


def collate_vision_unpaired(examples: list[dict], processor) -> dict:
    """B unpaired examples -> their right-padded rows and labels (collate_unpaired) with each row's images:
    pixel_values / image_grid_thw (or the family's image keys) in row order."""
    return {**collate_unpaired(examples, processor.pad_id()), **prompt_media(examples, processor)}
