"""SFT on image + text conversations for vision-language models (models/vision.py): SFTTrainer switches to these
when its model has a vision tower. Rows are encoded by data/vision.py's VisionEncoder (settings from the
SFTConfig, or from a VisionDataCollator passed as data_collator), batches carry pixel_values and image_grid_thw,
and the loss is the same target-token cross-entropy as for text."""
from __future__ import annotations

import os
from pathlib import Path

from fasttune.constants import MEDIA_KEYS
from fasttune.data.vision import VisionProcessor
from fasttune.data.vision_rows import VisionDataCollator, collate_vision
from fasttune.errors import ConfigError, DataError

BATCH_KEYS = (*MEDIA_KEYS, "token_type_ids")  # the media inputs a micro-batch may carry to the model (and
# PaliGemma's prefix / suffix)


def is_vision_model(model) -> bool:
    """Whether `model` is one of our vision-language models (models/vision.py gives them a `family`)."""
    return getattr(model, "family", None) is not None


def vision_examples(dataset, processor, args, max_seq_length: int, collator: VisionDataCollator | None) -> list:
    """Rows (list of dicts, datasets.Dataset, or a data file whose image paths are relative to its folder) ->
    encoded examples. Raises ConfigError when the processor is not a VisionProcessor, DataError for bad rows."""
    from fasttune.data.sources import load_rows

    if not isinstance(processor, VisionProcessor):
        raise ConfigError("A vision-language model trains with the processor FastVisionModel.from_pretrained "
                          "returned (pass it as tokenizer= / processing_class=).")
    base_dir = None
    if isinstance(dataset, (str, os.PathLike)):
        base_dir = Path(dataset).expanduser().resolve().parent
        dataset = load_rows(dataset)
    if collator is not None:
        encoder = collator.encoder(base_dir)
        encoder.max_seq_length = min(encoder.max_seq_length, max_seq_length)
    else:
        from fasttune.data.vision_rows import VisionEncoder

        encoder = VisionEncoder(processor, max_seq_length, args.train_on_responses_only, base_dir)
    examples = [encoder.encode(row, i) for i, row in enumerate(dataset)]
    if not examples:
        raise DataError("The training data has no rows.")
    return examples


def collate(examples: list[dict], processor) -> dict:
    """Encoded image + text examples -> one batch (input_ids, attention_mask, labels, pixel_values, image_grid_thw),
    as data/vision.py's collate_vision builds it with `processor`."""
    return collate_vision(examples, processor)
