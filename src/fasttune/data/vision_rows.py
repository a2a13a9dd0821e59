"""Vision-language rows for training: `VisionEncoder` turns one data row (messages with images, audio clips or
videos) into token ids, labels and its media's sources; `collate_vision` decodes a batch's media through the processor
(data/vision.py's VisionProcessor) and pads the rows; `VisionDataCollator` does both over raw rows, as Unsloth's
UnslothVisionDataCollator is used.

Labels: the image placeholders and padding are never targets; with train_on_responses_only only the assistant turns
are, found as the text encoder finds them (data/encode.py): the span from the end of
render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]). Images are decoded and
processed when a batch is collated, so a dataset's pixels are never all in memory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fasttune.constants import IGNORE_INDEX
from fasttune.data.images import absolute, to_pil
from fasttune.data.video import decoded
from fasttune.data.vision import VisionProcessor, _split_media, pad_rows
from fasttune.errors import DataError


class VisionEncoder:
    """Rows of image + text conversations -> examples {"input_ids", "labels", "images"} (images as their
    sources, decoded again at collate time). Raises DataError naming the row for a missing/unreadable image, a
    row without messages, or a row whose images do not fit max_seq_length."""

    def __init__(self, processor: VisionProcessor, max_seq_length: int, train_on_responses_only: bool,
                 base_dir: Path | None = None):
        self.processor, self.max_seq_length = processor, max_seq_length
        self.responses_only, self.base_dir = train_on_responses_only, base_dir

    def encode(self, row: dict, index: int) -> dict:
        """Row `index` -> {"input_ids", "labels" (lists of int, equal length), "images" (their sources)}; see the
        class docstring for the DataErrors."""
        where = f"Row {index}"
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: a vision-language row needs 'messages', a list of {{'role', 'content'}} "
                            f"whose content mixes {{'type': 'image', 'image': PATH}} and {{'type': 'text', ...}}.")
        messages, sources, heard, filmed = _split_media(messages, row.get("images"), where, row.get("audios"),
                                                        row.get("videos"))
        images = [to_pil(s, f"{where}, image {k + 1}", self.base_dir) for k, s in enumerate(sources)]
        grids = self.processor.image_grids(images, [len(images)])  # (one row: LLaVA-OneVision tiles only a lone one)
        p = self.processor
        clips = p.waveforms(heard, where, self.base_dir)
        counts = p.audio_counts(clips) if clips else []
        videos = p.frame_sources(filmed, where, self.base_dir)  # (decoded at collate time, as images are)
        vgrids = p.video_layouts(videos, where=where)

        def tokens(msgs, gen=False):
            """Token ids of messages `msgs` rendered by the chat template (gen: with the generation prompt), each
            image placeholder expanded to its image's tokens, each audio / video one to its clip's / video's."""
            text = p.apply_chat_template(msgs, add_generation_prompt=gen)
            n, m = text.count(p.image_token), text.count(p.audio_token) if p.audio_token else 0
            v = text.count(p.video_token) if p.video_token else 0
            text = p.expand_videos(p.expand_audio(p.expand(text, grids[:n]), counts[:m]), vgrids[:v])
            return p.tokenizer(text, add_special_tokens=False)["input_ids"]

        ids = tokens(messages)
        if self.responses_only or p.prefix_lm:  # (PaliGemma's prefix sees itself both ways: never a target)
            labels = [IGNORE_INDEX] * len(ids)
            for i, m in enumerate(messages):
                if m.get("role") == "assistant":
                    start, end = len(tokens(messages[:i], gen=True)), len(tokens(messages[:i + 1]))
                    labels[start:end] = ids[start:end]
        else:
            labels = list(ids)
        labels = [IGNORE_INDEX if t in p.image_token_ids else lab for t, lab in zip(ids, labels)]
        if len(ids) > self.max_seq_length:
            if p.image_token_id in ids[self.max_seq_length:]:
                raise DataError(f"{where}: {len(ids)} tokens with its images, more than max_seq_length "
                                f"{self.max_seq_length}, and the cut would fall inside an image. Raise "
                                f"max_seq_length, or make the images smaller (the image processor's max_pixels).")
            if p.video_token_id is not None and p.video_token_id in ids[self.max_seq_length:]:
                raise DataError(f"{where}: {len(ids)} tokens with its video, more than max_seq_length "
                                f"{self.max_seq_length}, and the cut would fall inside a video. Raise "
                                f"max_seq_length, or give fewer or smaller frames.")
            if p.audio_token_id is not None and p.audio_token_id in ids[self.max_seq_length:]:
                raise DataError(f"{where}: {len(ids)} tokens with its audio, more than max_seq_length "
                                f"{self.max_seq_length}, and the cut would fall inside a clip. Raise "
                                f"max_seq_length, or use shorter clips.")
            ids, labels = ids[:self.max_seq_length], labels[:self.max_seq_length]
        kept = [str(absolute(s, self.base_dir)) if isinstance(s, (str, Path)) else s for s in sources]
        example = {"input_ids": ids, "labels": labels, "images": kept}
        if clips:
            example["audio"] = clips
        if videos:  # (frame_sources' pairs as they are: a video file stays undecoded until its batch is collated)
            example["videos"] = videos
        return example


def collate_vision(examples: list[dict], processor: VisionProcessor) -> dict:
    """Examples of VisionEncoder -> one batch: input_ids / attention_mask / labels (B, T) right-padded, the images
    of all rows in order as pixel_values (patches, C*T*P*P) and image_grid_thw (images, 3), and their audio clips
    as input_features / input_features_mask; for PaliGemma (processor.prefix_lm) token_type_ids (B, T), 1 on the
    answers (the targets) and 0 on the prefix, as PaliGemmaProcessor's. Packed rows (data/packing.py) also give
    position_ids and segment_ids (B, T), padding 0, and their documents' image counts stand for rows'
    (`image_rows`)."""
    tensors, labels, _ = pad_rows([e["input_ids"] for e in examples], [e["labels"] for e in examples],
                                  processor.pad_id())
    batch = {**tensors, **labels}
    if processor.prefix_lm:  # PaliGemma: the answers (the targets) are the suffix, the rest the prefix
        batch["token_type_ids"] = (batch["labels"] != IGNORE_INDEX).long()
    width = batch["input_ids"].shape[1]
    for key in ("position_ids", "segment_ids"):  # packed rows
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] + [0] * (width - len(e[key])) for e in examples], dtype=torch.long)
    images = [to_pil(im, "an image of the batch") for e in examples for im in e["images"]]
    if images:  # (Llama 3.2 Vision batches the images per row: a packed row's are all its documents')
        rows = [len(e["images"]) for e in examples] if processor.cross_images else \
            [n for e in examples for n in e.get("image_rows", [len(e["images"])])]
        batch.update(processor.process_images(images, rows))
    clips = [c for e in examples for c in e.get("audio", ())]
    if clips:
        batch.update(processor.process_audio(clips))
    videos = decoded([v for e in examples for v in e.get("videos", ())], "A video of the batch")
    if videos:
        batch.update(processor.process_videos([frames for frames, _ in videos], [fps for _, fps in videos]))
    return batch


class VisionDataCollator:
    """A data collator over raw rows (Unsloth's UnslothVisionDataCollator shape): `collator(rows)` encodes each
    row (VisionEncoder) and collates the batch (collate_vision). Passed to SFTTrainer as data_collator=, its
    settings (max_seq_length, train_on_responses_only) are the ones the trainer uses for a vision model.

    model: the VisionCausalLM (read for its max_seq_length when none is given); processor: its VisionProcessor."""

    def __init__(self, model, processor, max_seq_length: int | None = None, train_on_responses_only: bool = False,
                 **_ignored):
        self.processor = processor
        self.max_seq_length = max_seq_length or getattr(model, "max_seq_length", None) or 2048
        self.train_on_responses_only = train_on_responses_only

    def encoder(self, base_dir: Path | None = None) -> VisionEncoder:
        """A VisionEncoder with this collator's settings; image paths relative to base_dir."""
        return VisionEncoder(self.processor, self.max_seq_length, self.train_on_responses_only, base_dir)

    def __call__(self, rows: list[dict]) -> dict:
        enc = self.encoder()
        return collate_vision([enc.encode(r, i) for i, r in enumerate(rows)], self.processor)


def content_preview(content) -> str:
    """A prompt's content for printing: its text, with <image> / <audio> / <video> where such an item stands."""
    if isinstance(content, str):
        return content
    return " ".join(f"<{i['type']}>" if i.get("type") in ("image", "audio", "video") else str(i.get("text", ""))
                    for i in content if isinstance(i, dict))
