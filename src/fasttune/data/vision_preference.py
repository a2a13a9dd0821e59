"""Preference rows with images for a vision-language model (DPO) -> token ids and image sources, and their batches.

As TRL 1.16's DPOTrainer reads a vision dataset: a row holds `images` (a list; or one `image`), a `prompt` of chat
messages whose {"type": "image"} items take those images in order (inline {"type": "image", "image": PATH} items
work too; a prompt without image items gets them before its first user text, as TRL places them: see
data/vision_prompts.py), and `chosen` / `rejected` assistant messages. The prompt is rendered by the chat template
with the generation prompt, and each completion is what rendering prompt + completion adds after it (TRL's
apply_chat_template); the prompt's tokens have each image placeholder expanded to its image's tokens (the processor's
own count), the completions are tokenized alone, without special tokens, as TRL's DataCollatorForVisionPreference
tokenizes them. Precomputed `ref_chosen_logps` / `ref_rejected_logps` columns are kept, as for text rows. A batch
repeats each pair's images for its chosen and its rejected row.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from fasttune.data.images import to_pil
from fasttune.data.preference import REF_COLUMNS, _number, _rows_and_columns, collate_pairs
from fasttune.data.vision import _split_media
from fasttune.data.vision_prompts import encode_vision_prompt, row_images
from fasttune.errors import DataError

VISION_PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def tokenize_vision_preference_rows(rows: Any, processor, *, max_seq_length: int, source_name: str | None = None,
                                    base_dir: Path | None = None) -> list[dict]:
    """Rows (list, datasets.Dataset or file path) -> [{"prompt_ids", "chosen_ids", "rejected_ids", "images"}]
    (images as their sources, decoded again at collate time) for `processor` (a VisionProcessor); image paths are
    relative to `base_dir`, else to the data file's folder when `rows` is a path. A pair longer than
    max_seq_length keeps its start (TRL's truncation); one whose prompt with its images alone fills it is dropped
    (a cut would split an image), with one warning. Raises DataError naming the row for missing columns, messages
    that are not lists, an image item without its image, more images than the prompt's image items, images in a
    completion, video or audio items, or an unreadable image."""
    if base_dir is None and isinstance(rows, (str, os.PathLike)):  # a data file: its images are relative to it
        base_dir = Path(rows).expanduser().resolve().parent
    rows, columns, source_name = _rows_and_columns(rows, source_name)
    missing = [c for c in VISION_PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{source_name or 'The dataset'} has no column {' or '.join(map(repr, missing))}; a "
                        f"vision-language model's preference rows need 'prompt', 'chosen' and 'rejected' chat "
                        f"messages (and 'images' for the prompt's image items).")
    refs = [c for c in REF_COLUMNS if c in columns]
    if len(refs) == 1:
        raise DataError(f"{source_name or 'The dataset'} has the column '{refs[0]}' but not its pair; precomputed "
                        f"reference log-probs need both {REF_COLUMNS} (or neither).")
    p = processor
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"Row {i}" + (f" of {source_name}" if source_name else "")
        fields = {}
        for key in ("chosen", "rejected"):
            value = row.get(key)
            if isinstance(value, str):
                value = [{"role": "assistant", "content": value}]
            if not isinstance(value, list) or not value:
                raise DataError(f"{where}: '{key}' must be a list of chat messages (or a string).")
            fields[key], more, _, _ = _split_media(value, None, where)
            if more:
                raise DataError(f"{where}: images go in the prompt; 'chosen' and 'rejected' hold the assistant's text.")
        prompt = encode_vision_prompt(row.get("prompt"), row_images(row), p, where, base_dir)
        completions = []
        for key in ("chosen", "rejected"):
            whole = p.apply_chat_template(prompt.messages + fields[key])
            if not whole.startswith(prompt.text):
                raise DataError(f"{where}: the chat template renders prompt + '{key}' with a different start than the "
                                f"prompt alone, so the completion cannot be told from it.")
            completions.append(p.tokenizer(whole[len(prompt.text):], add_special_tokens=False)["input_ids"])
        prompt_ids = prompt.ids
        if len(prompt_ids) >= max_seq_length:
            dropped += 1
            continue
        room = max_seq_length - len(prompt_ids)
        ex = {"prompt_ids": prompt_ids, "chosen_ids": completions[0][:room], "rejected_ids": completions[1][:room],
              "images": prompt.sources}
        for c in refs:  # precomputed reference log-probs, as for text rows
            ex[c] = _number(row.get(c), where, c)
        out.append(ex)
    if not out:
        raise DataError(f"No example is left in {source_name or 'the dataset'}: every prompt with its images fills "
                        f"max_seq_length={max_seq_length} tokens. Raise max_seq_length or use smaller images.")
    if dropped:
        warnings.warn(f"Dropped {dropped} of {len(rows)} rows whose prompt with its images fills max_seq_length="
                      f"{max_seq_length} tokens (a cut inside the prompt would split its images).", UserWarning,
                      stacklevel=2)
    return out


def collate_vision_pairs(examples: list[dict], processor) -> dict:
    """B pairs -> 2B right-padded rows, chosen first (collate_pairs), with each pair's images repeated for its
    chosen and its rejected row: pixel_values / image_grid_thw (or the family's image keys) in row order."""
    batch = collate_pairs(examples, processor.pad_id())
    images = [to_pil(im, "an image of the batch") for e in examples for im in e["images"]] * 2
    if images:
        batch.update(processor.process_images(images))
    return batch
