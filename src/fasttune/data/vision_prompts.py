"""A vision-language row's prompt with its images -> the chat messages, the rendered text and its token ids, as TRL
1.16's DPO and GRPO trainers lay a vision prompt out (the objectives' shared first step: DPO's
data/vision_preference.py, GRPO's train/objectives/grpo.py).

A prompt is a list of chat messages (a string is one user message); its {"type": "image"} items take the row's
`images` (a list) or `image` column in order, inline {"type": "image", "image": PATH} items work too. When the row
gives images and the prompt has no image item at all, the images go before the text of its first user message, as
TRL's prepare_multimodal_messages places them. The text is the chat template's rendering with the generation prompt;
its token ids have each image placeholder expanded to the processor's count of tokens for that image. Video items
(`{"type": "video", "video": [frame, ...] or a file or folder, "fps": 2}`, or bare ones taking the row's `videos`
column) are read as SFT reads them (data/video.py), on the families whose processor takes videos.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from fasttune.data.images import absolute, to_pil
from fasttune.data.vision import _column, _split_media
from fasttune.errors import DataError


class VisionPrompt(NamedTuple):
    """messages: the prompt's messages with image and video items reduced to {"type": ...}; text: their rendering
    with the generation prompt; ids: its token ids, image and video placeholders expanded; sources: the images as given
    (paths made absolute), decoded again when a batch is built; videos: the videos as (frame sources, fps) pairs
    (data/video.py's frame_sources), decoded when a batch is built."""

    messages: list[dict]
    text: str
    ids: list[int]
    sources: list
    videos: list = []


def row_images(row: dict) -> Any:
    """The row's image column: `images` (a list, or one image) when present and not null, else `image`."""
    return row.get("images") if row.get("images") is not None else row.get("image")


def has_images(row: dict) -> bool:
    """Whether the row gives an image in its `images` / `image` column or inline in a `prompt` message."""
    prompt = row.get("prompt")
    return bool(_column(row_images(row))) or (isinstance(prompt, list) and _image_items(prompt) > 0)


def _with_image_items(messages: list, n: int) -> list:
    """TRL's placement for a prompt without image items: n of them before the text of the first user message."""
    out, placed = [], False
    for m in messages:
        if not placed and isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            m = {**m, "content": [{"type": "image"} for _ in range(n)] + text}
            placed = True
        out.append(m)
    return out


def _image_items(messages: list) -> int:
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for item in m["content"] if isinstance(item, dict) and item.get("type") == "image")


def encode_vision_prompt(prompt: Any, column: Any, processor, where: str,
                         base_dir: Path | None = None, video_column: Any = None, **template_kwargs) -> VisionPrompt:
    """A row's `prompt` (messages, or a string for one user message) and its image column -> VisionPrompt.

    Args:
        prompt: the row's prompt field; column: its `images` list or single `image` (row_images), or None;
            video_column: its `videos` list, for bare video items.
        processor: fasttune's VisionProcessor (data/vision.py). where: the row, for messages. base_dir: the folder
            relative image paths are read from (the data file's). template_kwargs: chat-template variables (TRL's
            chat_template_kwargs).
    Raises: DataError naming `where` for a prompt that is not messages, a message of the wrong shape, an image item
        without its image, more images than the prompt has places for, audio items, video items on a family whose
        processor takes no videos, or an unreadable image or video.
    """
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a list of chat messages (or a string).")
    given = len(_column(column))
    if given and not _image_items(prompt):
        if not any(isinstance(m, dict) and m.get("role") == "user" for m in prompt):
            raise DataError(f"{where}: the row gives {given} images but its prompt has no user message to hold them.")
        prompt = _with_image_items(prompt, given)
    messages, sources, clips, videos = _split_media(prompt, column, where, video_column=video_column)
    if clips:
        raise DataError(f"{where}: the prompt has an audio item; this objective reads images and videos only. Train "
                        f"with SFT.")
    inline = sum(1 for m in prompt if isinstance(m.get("content"), list) for item in m["content"]
                 if isinstance(item, dict) and item.get("type") == "image"
                 and any(item.get(k) is not None for k in ("image", "path", "url")))
    if given > len(sources) - inline:
        raise DataError(f"{where}: the row gives {given} images but its prompt has places (image items) for "
                        f"{len(sources) - inline} of them; add an {{'type': 'image'}} item for each.")
    images = [to_pil(s, f"{where}, image {k + 1}", base_dir) for k, s in enumerate(sources)]
    p = processor
    text = p.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    n = text.count(p.image_token)
    if n != len(images):
        raise DataError(f"{where}: the prompt has {n} image placeholders but {len(images)} images.")
    filmed = p.frame_sources(videos, where, base_dir)  # (nothing decoded: only each video's first frame is read)
    expanded = p.expand_videos(p.expand(text, p.image_grids(images, [len(images)])),
                               p.video_layouts(filmed, where=where))
    ids = p.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    kept = [str(absolute(s, base_dir)) if isinstance(s, (str, Path)) else s for s in sources]
    return VisionPrompt(messages, text, list(ids), kept, filmed)


def with_image_payloads(prompt: VisionPrompt) -> list[dict]:
    """The prompt's messages as TRL's prepare_multimodal_messages leaves them for reward functions: every content a
    list of items, each image item carrying its image ({"type": "image", "image": source}, in order), and each video
    item its frames or file ({"type": "video", "video": source})."""
    sources, videos = iter(prompt.sources), iter(prompt.videos)

    def payload(item):
        """The item with its image or video."""
        kind = item.get("type")
        if kind == "image":
            return {**item, "image": next(sources)}
        return {**item, "video": next(videos)[0]} if kind == "video" else item
    return [{**m, "content": [payload(item) for item in m["content"]]} for m in prompt.messages]


def prompt_media(examples: list[dict], processor, decoded: dict | None = None) -> dict:
    """The image inputs (pixel_values with image_grid_thw, or the family's image keys: processor.process_images) of
    the examples' images in row order, and the video inputs (pixel_values_videos with the family's keys:
    processor.process_videos) of their videos, each example's `images` / `videos` sources decoded again, once per
    example object (a GRPO group's copies, a DPO pair's two rows are one); {} when none has either. decoded: a dict
    (example id -> its decoded images and videos) that keeps the decoded media for later calls on the same
    examples (GRPO's sampling and then scoring of one rollout decode each video once); its owner clears it."""
    from fasttune.data.video import decoded as decode_videos

    seen: dict[int, tuple] = {} if decoded is None else decoded
    for ex in examples:
        if id(ex) not in seen:
            seen[id(ex)] = ([to_pil(s, "an image of the batch") for s in ex.get("images", ())],
                            decode_videos(list(ex.get("videos", ())), "A video of the batch"))
    images = [im for ex in examples for im in seen[id(ex)][0]]
    out = processor.process_images(images, [len(seen[id(ex)][0]) for ex in examples]) if images else {}
    videos = [v for ex in examples for v in seen[id(ex)][1]]
    if videos:
        out = {**out, **processor.process_videos([frames for frames, _ in videos], [fps for _, fps in videos])}
    return out


def require_processor(tokenizer, trainer: str):
    """Raises ConfigError unless `tokenizer` is the VisionProcessor FastVisionModel.from_pretrained returned (what
    `trainer` needs on a vision-language model to lay out images)."""
    from fasttune.data.vision import VisionProcessor
    from fasttune.errors import ConfigError

    if not isinstance(tokenizer, VisionProcessor):
        raise ConfigError(f"{trainer} on a vision-language model takes the processor FastVisionModel.from_pretrained "
                          f"returned (processing_class=...).")
