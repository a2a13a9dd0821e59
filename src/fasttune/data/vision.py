"""Image (audio: data/audio.py; video frames: data/video.py) + text conversations for vision-language models: the
processor (the per-row encoder and the collator: data/vision_rows.py).

`VisionProcessor` is what transformers' processor does for training, from borrowed parts: the checkpoint's
tokenizer, its image processor (`AutoImageProcessor`, which needs no torchvision) and its chat template. The
rendered text carries one placeholder per image (`<|image_pad|>` for Qwen2.5-VL), which is expanded to as many
placeholder tokens as the image gives features (grid t*h*w / merge^2), as Qwen2_5_VLProcessor does.

Rows: `messages` whose `content` is a string or a list of `{"type": "text", "text": ...}` and
`{"type": "image", "image": PIL image | path | bytes}` items (a path is relative to the data file); an `images`
column may hold the images instead, in order, for items written as `{"type": "image"}` (TRL's layout).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import ProcessorMixin

from fasttune.constants import IGNORE_INDEX
from fasttune.data.audio import AudioClips
from fasttune.data.formats import positive_number
from fasttune.data.images import to_pil
from fasttune.data.video import (GEMMA4_VIDEO, QWEN3_VIDEO_SIZE, VIDEO_CONFIG, VideoFrames, decoded,
                                 read_video_settings, video_config, video_list, video_rate)
from fasttune.data.vision_layouts import anyres_token_count, cross_image_batch, flat_ints, tile_mark
from fasttune.errors import DataError, ModelLoadError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class VisionProcessor(ProcessorMixin, AudioClips, VideoFrames):
    """Tokenizer + image processor + chat template of a vision-language checkpoint.

    Attributes the tokenizer has (pad_token_id, eos_token, decode, ...) are read through to it, so the processor
    stands where a tokenizer is expected. It is a transformers ProcessorMixin for code that checks for a processor
    (TRL's SFTTrainer); ProcessorMixin's __init__, which validates its parts' classes (a video processor among them,
    which needs torchvision), is not used. `image_token`: the placeholder the template writes per image;
    `feature_token`: the token each image feature replaces (default image_token); the placeholder becomes either
    `image_sequence` (Gemma 3: "\\n\\n<start_of_image>" + 256 soft tokens + "<end_of_image>\\n\\n", as
    Gemma3Processor writes), or one feature token per merged patch, `merge_size` per side (Qwen2.5-VL: 2), or,
    with `image_rows` = (break token, end token, pixels per token side) (Pixtral in Mistral 3, as PixtralProcessor
    writes), one feature token per token side of the resized image, each row of them closed by the break token and
    the last by the end token, or, with `soft_token_marks` = (begin token, end token) (Gemma 4, as Gemma4Processor
    writes), the image processor's count of soft tokens for that image between the two marks, or, with
    `image_tiles` = (fake token, global token, tokens per tile) (Idefics3 / SmolVLM, as Idefics3Processor writes),
    per crop of the image's rows x cols grid the fake token, its `<row_r_col_c>` token and the tile's feature tokens
    (a newline after each row of crops), then the whole image's tile between fake tokens after the global token, or,
    with `patch_span` = (start token, end token, tokens per patch) (InternVL, as InternVLProcessor writes), the start
    token, the feature token once per token of each of the image's patches (its crops and thumbnail) and the end
    token, or, with `anyres` = (grid pinpoints ((height, width) pixels each), tile side, patch side, most tiles or
    None) (LLaVA-NeXT / LLaVA-OneVision, as their processors count them: `anyres_token_count`), the feature token once
    per feature of the image's whole-image tile, of its grid of tiles cut back to its aspect ratio and of one newline
    a row, or, with `cross_images` (Llama 3.2 Vision, as MllamaProcessor writes), the placeholder itself (the images
    reach the text through cross-attention; `image_sequence` is then the placeholder), the images batched per row
    (`cross_image_batch`), or, with `aya_tiles` = (start token, end token, tile word, global word, tokens per tile)
    (Aya Vision, as AyaVisionProcessor writes), the start token, for each crop `<tile word>_<k>` and its feature
    tokens, the global word and the thumbnail's feature tokens, and the end token. The rows' tokens (and the tile marks
    and InternVL's start / end tokens) are never targets
    (`image_token_ids`).

    Audio (Gemma 4 E2B / E4B, data/audio.py): with `audio_extractor` (the checkpoint's feature extractor) and
    `audio_marks` = (begin token, audio token, end token), each audio token the template writes becomes the begin
    mark, one audio token per soft token of its clip and the end mark, as Gemma4Processor writes it; the audio tokens
    are never targets either."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None, image_token: str,
                 merge_size: int | None = None, feature_token: str | None = None, image_sequence: str | None = None,
                 image_rows: tuple | None = None, soft_token_marks: tuple | None = None, audio_extractor=None,
                 audio_marks: tuple | None = None, video_token: str | None = None, video_settings: dict | None = None,
                 video_stamps: tuple | None = None, image_tiles: tuple | None = None, patch_span: tuple | None = None,
                 anyres: tuple | None = None, cross_images: bool = False, aya_tiles: tuple | None = None,
                 prefix_lm: bool = False):
        self.tokenizer = tokenizer
        self.prefix_lm = prefix_lm
        self.cross_images = cross_images
        self.aya_tiles = aya_tiles
        self.anyres = anyres
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = image_token
        self.feature_token = feature_token or image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.feature_token)
        self.merge_size = merge_size
        self.image_sequence = image_sequence
        self.image_rows = image_rows
        self.soft_token_marks = soft_token_marks
        # the tokens an image expands to that are never targets: its feature tokens, and Pixtral's row marks
        self.image_token_ids = {self.image_token_id} | (
            set(tokenizer.convert_tokens_to_ids(list(image_rows[:2]))) if image_rows else set())
        self.image_tiles = image_tiles
        if image_tiles:  # the fake and global tokens and each crop's <row_r_col_c> (those the tokenizer has)
            marks = list(image_tiles[:2]) + [tile_mark(r, c) for r in range(1, 7) for c in range(1, 7)]
            ids = tokenizer.convert_tokens_to_ids(marks)
            self.image_token_ids |= {i for i in ids if i is not None and i != tokenizer.unk_token_id}
        self.patch_span = patch_span
        if patch_span:
            self.image_token_ids |= set(tokenizer.convert_tokens_to_ids(list(patch_span[:2])))
        if aya_tiles:  # (its TILE_<n> / TILE_GLOBAL marks are plain text: trained, as transformers' collators leave
            # them)
            self.image_token_ids |= set(tokenizer.convert_tokens_to_ids(list(aya_tiles[:2])))
        self.audio_extractor = audio_extractor if audio_marks else None
        self.audio_marks = audio_marks if audio_extractor is not None else None
        self.audio_token = self.audio_marks[1] if self.audio_marks else None
        self.audio_token_id = tokenizer.convert_tokens_to_ids(self.audio_token) if self.audio_token else None
        if self.audio_token_id is not None:
            self.image_token_ids.add(self.audio_token_id)
        self.video_token, self.video_settings = video_token, video_settings  # (data/video.py)
        self.video_stamps = video_stamps if video_token else None  # Qwen3-VL's (vision start, vision end)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if video_token else None
        if self.video_token_id is not None:
            self.image_token_ids.add(self.video_token_id)

    @classmethod
    def from_pretrained(cls, folder, image_token: str = "<|image_pad|>", merge_size: int | None = 2,
                        tokenizer=None, feature_token: str | None = None, image_sequence: str | None = None,
                        image_rows: tuple | None = None, soft_token_marks: tuple | None = None,
                        audio_marks: tuple | None = None, video_token: str | None = None,
                        video_stamps: tuple | None = None, image_tiles: tuple | None = None,
                        patch_span: tuple | None = None, anyres: tuple | None = None,
                        video_default: dict | None = None, cross_images: bool = False,
                        aya_tiles: tuple | None = None, prefix_lm: bool = False,
                        default_template: str | None = None) -> "VisionProcessor":
        """Load the parts saved in `folder` (the tokenizer too unless given; with audio_marks, the audio feature
        extractor). video_default: the video settings where the folder has no video_preprocessor_config.json
        (data/video.py's read_video_settings; by default the family's, from soft_token_marks / video_stamps).
        prefix_lm: PaliGemma's layout (its prompt attends both ways; the answer is the only target: token_type_ids);
        default_template: the chat template where the folder and the tokenizer have none (PaliGemma's). Raises
        ModelLoadError naming the missing part."""
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                raise ModelLoadError(f"No usable tokenizer in '{folder}' ({e}).") from None
        try:
            image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"No usable image processor in '{folder}' ({e}): a vision-language model needs "
                                 f"its preprocessor_config.json beside the weights.") from None
        audio_extractor = None
        if audio_marks:
            from transformers import AutoFeatureExtractor

            try:
                audio_extractor = AutoFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"No usable audio feature extractor in '{folder}' ({e}): a model with an audio "
                                     f"tower needs the feature_extractor entry of its processor_config.json.") from None
        return cls(tokenizer, image_processor, read_chat_template(folder) or getattr(tokenizer, "chat_template", None)
                   or default_template, image_token, merge_size, feature_token,
                   image_sequence, image_rows, soft_token_marks, audio_extractor, audio_marks, video_token,
                   read_video_settings(folder, video_default or (GEMMA4_VIDEO if soft_token_marks else QWEN3_VIDEO_SIZE
                                                                 if video_stamps else None)) if video_token else None,
                   video_stamps, image_tiles, patch_span, anyres, cross_images, aya_tiles, prefix_lm)

    def with_tokenizer(self, tokenizer) -> "VisionProcessor":
        """This processor around another tokenizer (an adapter's own, with its added tokens and chat template, the
        template falling back to this one's): every image / audio / video setting kept, their token ids looked up
        in `tokenizer`."""
        template = getattr(tokenizer, "chat_template", None) or self.chat_template
        return VisionProcessor(tokenizer, self.image_processor, template, self.image_token, self.merge_size,
                               self.feature_token, self.image_sequence, self.image_rows, self.soft_token_marks,
                               self.audio_extractor, self.audio_marks, self.video_token, self.video_settings,
                               self.video_stamps, self.image_tiles, self.patch_span, self.anyres, self.cross_images,
                               self.aya_tiles, self.prefix_lm)

    def __getattr__(self, name):
        if name in ("tokenizer", "image_processor", "audio_extractor", "audio_marks", "video_token",
                    "video_settings", "video_stamps", "image_tiles", "patch_span", "anyres",
                    "cross_images", "aya_tiles", "prefix_lm"):  # not set yet
            # (unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors=None, **kwargs):
        """The conversation as text, one placeholder per image / clip (not yet expanded); with tokenize=True, as
        transformers' processors do it: the conversation (or a list of them) with its images and clips read from
        its items -> chat_inputs' LEFT-padded batch (a transformers BatchFeature, `.to(device)` works) when
        return_dict, else its input_ids (a tensor with return_tensors, else lists). `kwargs` reach the template
        (enable_thinking, tools, chat_template: another template than the processor's); padding / truncation /
        return_assistant_tokens_mask are accepted and left out. Raises DataError for unreadable media."""
        kwargs["chat_template"] = kwargs.get("chat_template") or self.chat_template  # (TRL passes None)
        if tokenize:
            for key in ("padding", "truncation", "max_length", "tokenizer_kwargs", "processor_kwargs",
                        "return_assistant_tokens_mask"):
                kwargs.pop(key, None)
            batch = self.chat_inputs(messages, add_generation_prompt, **kwargs)
            if return_dict:
                from transformers import BatchFeature

                return BatchFeature(batch)
            return batch["input_ids"] if return_tensors else batch["input_ids"].tolist()
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def process_images(self, images: list, rows: list[int] | None = None) -> dict:
        """PIL images -> {"pixel_values"} float32 (Qwen2.5-VL: patches (P, C*T*P*P) plus "image_grid_thw" (images,
        3) long; Gemma 3: (images, C, H, W); Mistral 3: (images, C, H, W) zero-padded to the largest, plus
        "image_sizes" (images, 2) long, each resized to whole tokens as PixtralProcessor asks; Idefics3 / SmolVLM:
        the images' tiles (tiles, C, H, W), each image's crops then the whole image, plus "pixel_attention_mask"
        (tiles, H, W) long; InternVL: the images' patches (patches, C, H, W), each image's crops then its thumbnail;
        LLaVA-NeXT / -OneVision: each image's tiles (images, tiles, C, H, W), padded, plus "image_sizes"; Llama 3.2
        Vision: per row its images' tiles (rows, images, tiles, C, H, W) with aspect_ratio_ids / aspect_ratio_mask,
        see cross_image_batch). `rows`: how
        many of the images each row holds, in order (LLaVA-OneVision does not tile the images of a row holding several,
        and the batch then carries "batch_num_images"); None: one row each (transformers' reading of a flat list)."""
        return self.processed_images(images, rows)[0]

    def processed_images(self, images: list, rows: list[int] | None = None) -> tuple[dict, list]:
        """(`process_images`' batch, `image_grids`' list) of PIL images from one run of the image processor."""
        if self.cross_images:
            return cross_image_batch(self.image_processor, images, rows), [None] * len(images)
        if self.anyres is not None and self.anyres[3] is not None and rows is not None and max(rows, default=1) > 1:
            return self._rows_of_images(images, rows)
        if self.image_tiles is not None:
            out = self.image_processor(images=[[im] for im in images], return_tensors="pt",
                                       return_row_col_info=True)
            crop_rows, crop_cols = flat_ints(out["rows"]), flat_ints(out["cols"])
            counts = [r * c + 1 for r, c in zip(crop_rows, crop_cols)]
            batch = {key: torch.cat([out[key][i, :n] for i, n in enumerate(counts)])
                     for key in ("pixel_values", "pixel_attention_mask")}
            return batch, list(zip(crop_rows, crop_cols))  # each image's grid of crops, (rows, cols); (0, 0) for none
        extra = self._crop_kwargs()
        if self.image_rows is not None:  # sides in whole (merged) tokens, as PixtralProcessor resizes
            side = self.image_rows[2]
            extra["patch_size"] = {"height": side, "width": side}
        out = self.image_processor(images=images, return_tensors="pt", **extra)
        batch = {"pixel_values": out["pixel_values"]}
        for key in ("image_grid_thw", "image_sizes", "image_position_ids"):
            if key in out:
                batch[key] = torch.as_tensor(out[key]).long()
        if self.image_sequence is not None:  # fixed-size families: nothing to count
            grids = [None] * len(images)
        elif self.patch_span is not None:  # InternVL: each image's patches (crops and thumbnail) x tokens a patch
            grids = [int(n) * int(self.patch_span[2]) for n in out["num_patches"]]
        elif self.aya_tiles is not None:  # Aya Vision: each image's patch count (crops and thumbnail)
            grids = [int(n) for n in out["num_patches"]]
        elif self.soft_token_marks is not None:  # Gemma 4: the image processor counts each image's soft tokens
            grids = [int(n) for n in out["num_soft_tokens_per_image"]]
        else:  # Mistral 3: each resized (height, width); LLaVA-NeXT / -OneVision: each original one; Qwen: (t, h, w)
            sized = self.image_rows is not None or self.anyres is not None
            grids = batch["image_sizes" if sized else "image_grid_thw"].tolist()
        return batch, grids

    def _crop_kwargs(self) -> dict:
        """InternVL: crop_to_patches=True, as InternVLProcessor passes it (its images_kwargs) over the image
        processor's own setting, which released checkpoints save as false (one squashed tile per image)."""
        return {"crop_to_patches": True} if self.patch_span is not None or self.aya_tiles is not None else {}

    def _rows_of_images(self, images: list, rows: list[int]) -> tuple[dict, list]:
        """LLaVA-OneVision with a row of several images: the image processor takes the images nested per row (its
        batch_num_images), tiling the images of single-image rows only; their grids are their sizes, the others' None
        (their whole-image tile and a newline, `expand`). Rows without images are left out."""
        rows = [n for n in rows if n]
        if sum(rows) != len(images):
            raise ValueError(f"rows {rows} do not add up to the {len(images)} images")
        starts = [sum(rows[:i]) for i in range(len(rows))]
        out = self.image_processor(images=[images[s:s + n] for s, n in zip(starts, rows)], return_tensors="pt")
        batch = {"pixel_values": out["pixel_values"], "image_sizes": torch.as_tensor(out["image_sizes"]).long(),
                 "batch_num_images": torch.as_tensor(rows).long()}
        row_of_image = [n for n in rows for _ in range(n)]  # each image's row's image count
        return batch, [size if n == 1 else None for size, n in zip(batch["image_sizes"].tolist(), row_of_image)]

    def image_grids(self, images: list, rows: list[int] | None = None) -> list:
        """Per image what its token count depends on (Qwen: its (t, h, w) grid; Mistral 3: its resized (height,
        width); Idefics3: its (rows, cols) of crops; InternVL / Gemma 4: its token count; fixed-size families:
        None, without running the image processor)."""
        if not images:
            return []
        if self.image_sequence is not None:
            return [None] * len(images)
        return self.processed_images(images, rows)[1]

    def expand(self, text: str, grids) -> str:
        """Each image placeholder of `text` repeated to the token count of its image (grids: (images, 3))."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(grids):
            raise DataError(f"The text has {len(parts) - 1} image placeholders but {len(grids)} images were given.")
        out = [parts[0]]
        for grid, rest in zip(grids, parts[1:]):
            if self.image_sequence is not None:
                out.append(self.image_sequence + rest)
            elif self.image_rows is not None:
                out.append(self._rows(grid) + rest)
            elif self.image_tiles is not None:
                out.append(self._tiles(*grid) + rest)
            elif self.patch_span is not None:
                out.append(self.patch_span[0] + self.feature_token * int(grid) + self.patch_span[1] + rest)
            elif self.aya_tiles is not None:
                out.append(self._aya_tiles(int(grid)) + rest)
            elif self.anyres is not None:  # (None: LLaVA-OneVision's untiled image, its tile and a newline)
                count = (self.anyres[1] // self.anyres[2]) ** 2 + 1 if grid is None else \
                    anyres_token_count(*grid, *self.anyres)
                out.append(self.feature_token * count + rest)
            elif self.soft_token_marks is not None:
                begin, end = self.soft_token_marks
                out.append(begin + self.feature_token * int(grid) + end + rest)
            else:
                out.append(self.feature_token * (int(torch.as_tensor(grid).prod()) // self.merge_size ** 2) + rest)
        return "".join(out)

    def _rows(self, size) -> str:
        """Pixtral's tokens for an image of `size` (height, width) pixels: its rows of feature tokens, each closed
        by the break token, the last by the end token."""
        brk, end, side = self.image_rows
        height, width = (int(v) for v in size)
        rows = [self.feature_token * (width // side)] * (height // side)
        return brk.join(rows) + end

    def _aya_tiles(self, patches: int) -> str:
        """Aya Vision's tokens for an image cut into `patches` patches (its crops, then the thumbnail; 1: the
        thumbnail alone), as AyaVisionProcessor.replace_image_token writes them."""
        start, end, tile, whole, per_tile = self.aya_tiles
        tokens = self.feature_token * int(per_tile)
        crops = "".join(f"{tile}_{k}{tokens}" for k in range(1, patches))
        return f"{start}{crops}{whole}{tokens}{end}"

    def _tiles(self, rows: int, cols: int) -> str:
        """Idefics3's tokens for an image cut into rows x cols crops (0 x 0: the whole image only)."""
        fake, whole, per_tile = self.image_tiles
        tile = self.feature_token * int(per_tile)
        crops = "".join("".join(f"{fake}{tile_mark(r, c)}{tile}" for c in range(1, cols + 1)) + "\n"
                        for r in range(1, rows + 1))
        return crops + ("\n" if rows else "") + f"{fake}{whole}{tile}{fake}"

    def __call__(self, text=None, images=None, return_tensors=None, audio=None, videos=None, **kwargs) -> dict:
        """text (str or list[str], rendered with placeholders) and the images (and audio clips) in order over the
        texts -> input_ids / attention_mask (B, T) right-padded, plus pixel_values and image_grid_thw when there are
        images (input_features and input_features_mask when there are clips), as transformers' processors return
        them (always as torch tensors, in a BatchFeature: `.to(device)` works). Without media the call is the
        tokenizer's (same arguments), on a batch of one for a single string, as transformers' processors do it
        (TRL's SFTTrainer takes the first row of what a processor returns). As
        transformers' processors take `(images, text)` positionally, an image first and the text second are taken
        in that order too; one image (or clip) may stand for a list of one. `videos` (the Qwen families, Gemma 4):
        a video or a list of them, each a video file, a folder of frames, a list of frames (PIL images or uint8
        arrays) or one (T, H, W, C) array (data/video.py's video_list), frames taken as sampled (transformers'
        do_sample_frames=False) unless sampled as transformers' video processor samples them by default or when
        asked (`do_sample_frames`: on for Qwen3-VL / Qwen3.5 and Gemma 4, see VideoFrames.sample_sources), giving
        pixel_values_videos / video_grid_thw (/ second_per_grid_ts); their rate (24 frames a second when not
        given) and, for Qwen3-VL's timestamps, the frames' indices in the source video come from `video_metadata`
        (per video a dict or transformers' VideoMetadata with "fps" and "frames_indices", as qwen-vl-utils gives
        them). Raises DataError for do_sample_frames=True on Qwen2-VL / Qwen2.5-VL (sample the frames first)."""
        if images is not None and _is_text(images) and text is not None and not _is_text(text):
            text, images = images, text  # processor(image, text, ...), the notebooks' order
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if audio is not None and (not isinstance(audio, (list, tuple)) or _is_samples(audio)):
            audio = [audio]
        videos = video_list(videos)
        joined = "" if text is None else "".join([text] if isinstance(text, str) else text)
        marks = self.image_token in joined or any(t is not None and t in joined
                                                  for t in (self.audio_token, self.video_token))
        if not images and not audio and not videos and not marks:  # (a batch of one for a string, as transformers')
            return self.tokenizer([text] if isinstance(text, str) else text, return_tensors=return_tensors, **kwargs)
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        grids, counts = [], []
        if images:
            pil = [to_pil(im, "images") for im in images]
            per_row = [t.count(self.image_token) for t in texts] if self.cross_images else None
            out, grids = self.processed_images(pil, per_row)  # one run of the image processor for both
        if audio:
            from fasttune.data.audio import to_waveform

            clips = [to_waveform(c, f"audio clip {i + 1}", self.sampling_rate) for i, c in enumerate(audio)]
            out.update(self.process_audio(clips))
            counts = self.audio_counts(clips)
        rates, indices = _video_metadata(kwargs, len(videos))
        sources = self.frame_sources(list(zip(videos, rates)), "videos")  # (a file's pair: its sampling rate)
        sample = kwargs.get("do_sample_frames")
        if sample if sample is not None else (self.video_settings or {}).get("do_sample_frames", False):
            sources, indices = self.sample_sources(sources, indices)
        vgrids = self.video_layouts(sources, indices)  # (before decoding: a video file keeps its frames' indices)
        filmed = decoded(sources, "videos")
        if filmed:
            out.update(self.process_videos([frames for frames, _ in filmed], [fps for _, fps in filmed]))
        expanded, used, heard, seen = [], 0, 0, 0
        for t in texts:
            n, m = t.count(self.image_token), t.count(self.audio_token) if self.audio_token else 0
            v = t.count(self.video_token) if self.video_token else 0
            t = self.expand_audio(self.expand(t, grids[used:used + n]), counts[heard:heard + m])
            expanded.append(self.expand_videos(t, vgrids[seen:seen + v]))
            used, heard, seen = used + n, heard + m, seen + v
        if used != len(grids) or heard != len(counts) or seen != len(vgrids):
            raise DataError(f"{len(grids)} images, {len(counts)} audio clips and {len(vgrids)} videos were given for "
                            f"{used} image, {heard} audio and {seen} video placeholders in the text.")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in expanded]
        out.update(pad_rows(ids, ids, self.pad_id())[0])
        from transformers import BatchFeature

        return BatchFeature(out)

    def prompt_inputs(self, contents: list, base_dir: Path | None = None) -> dict:
        """User turns to generate from -> a LEFT-padded batch for model.generate: input_ids / attention_mask (B, T)
        plus pixel_values / image_grid_thw of their images in order. contents: per row, a string or a list of
        text / image items (as in data rows; image paths relative to base_dir). Raises DataError for unreadable
        images."""
        return self.chat_inputs([[{"role": "user", "content": c}] for c in contents], True, base_dir,
                                where="Prompt")

    def chat_inputs(self, conversations: list, add_generation_prompt: bool = True, base_dir: Path | None = None,
                    where: str = "Conversation", **template_kwargs) -> dict:
        """Conversations (a list of {"role", "content"} messages, or a list of such lists) with image / audio items
        (as in data rows) -> a LEFT-padded batch for model.generate: input_ids / attention_mask (B, T) plus the
        media's pixel_values / image_grid_thw / input_features ... in order. Raises DataError (naming `where` and
        the conversation's number) for unreadable media."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        rows, images, clips, videos, per_row = [], [], [], [], []
        for k, conversation in enumerate(conversations):
            at = f"{where} {k + 1}"
            messages, sources, heard, filmed = _split_media(list(conversation), None, at)
            row_images = [to_pil(s, f"{at}, image {i + 1}", base_dir) for i, s in enumerate(sources)]
            row_clips = self.waveforms(heard, at, base_dir)
            row_videos = self.video_sources(filmed, at, base_dir)
            text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
            text = self.expand(text, self.image_grids(row_images, [len(row_images)]))
            text = self.expand_audio(text, self.audio_counts(row_clips) if row_clips else [])
            text = self.expand_videos(text, self.video_layouts(row_videos, where=at))
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            images += row_images
            per_row.append(len(row_images))
            clips += row_clips
            videos += row_videos
        width = max(len(r) for r in rows)
        batch = {"input_ids": torch.tensor([[self.pad_id()] * (width - len(r)) + r for r in rows]),
                 "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
        if images:
            batch.update(self.process_images(images, per_row))
        if clips:
            batch.update(self.process_audio(clips))
        if videos:
            batch.update(self.process_videos([frames for frames, _ in videos], [fps for _, fps in videos]))
        return batch

    def pad_id(self) -> int:
        """The tokenizer's pad id, else its eos id, else 0."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def save_pretrained(self, folder):
        """Write the tokenizer, image processor and chat template into `folder` (what from_pretrained reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.audio_extractor is not None:  # as transformers 5 keeps a processor's parts (AutoFeatureExtractor
            config = folder / "processor_config.json"  # reads it back)
            saved = json.loads(config.read_text()) if config.is_file() else {}
            saved["feature_extractor"] = json.loads(self.audio_extractor.to_json_string())
            config.write_text(json.dumps(saved, indent=2))
        if self.video_settings is not None:  # (what read_video_settings reads back)
            (folder / VIDEO_CONFIG).write_text(json.dumps(video_config(self.video_settings), indent=2))
        if self.chat_template:
            (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
        return folder


def _is_text(value) -> bool:
    """Whether `value` is a processor's text argument: a string or a list of strings."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def _is_samples(value) -> bool:
    """Whether `value` is one clip's samples (a list of numbers) rather than a list of clips."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, (int, float)) for v in value)


def read_chat_template(folder: Path) -> str | None:
    """The processor's chat template saved in `folder` (chat_template.jinja, or chat_template.json's field)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def pad_rows(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[dict, dict, int]:
    """Right-pad rows -> ({"input_ids", "attention_mask"}, {"labels"}, width), each (B, T) long."""
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    lab = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (r, l) in enumerate(zip(ids, labels)):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
        lab[i, :len(l)] = torch.tensor(l, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask}, {"labels": lab}, width


def _column(column) -> list:
    return list(column) if isinstance(column, (list, tuple)) else ([] if column is None else [column])


def _split_media(messages: list, column, where: str, audio_column=None,
                 video_column=None) -> tuple[list[dict], list, list, list]:
    """Messages with each image / audio / video item reduced to {"type": ...} (what the template reads), and the
    images', clips' and videos' sources in order, inline ("image" / "audio" / "video" / "path" / "url" keys) or, for
    bare items, from the row's `images` / `audios` / `videos` column; videos as (source, fps) pairs."""
    column, audio_column = iter(_column(column)), iter(_column(audio_column))
    video_column = iter(_column(video_column))
    out, sources, clips, videos = [], [], [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: message {k + 1} is not a {{'role', 'content'}} dict.")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise DataError(f"{where}: message {k + 1}'s content must be a string or a list of items.")
        items = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in ("image", "audio"):
                image = kind == "image"
                keys, rest = (("image", "path", "url"), column) if image else (("audio", "path"), audio_column)
                src = next((item[key] for key in keys if item.get(key) is not None), None)
                if src is None:
                    src = next(rest, None)
                    if src is None:
                        raise DataError(f"{where}: message {k + 1} has an {kind} item without its {kind}, and the "
                                        f"row's '{kind}s' column has no {kind} left for it.")
                (sources if image else clips).append(src)
                items.append({"type": kind})
            elif kind == "text":
                items.append({"type": "text", "text": str(item.get("text", ""))})
            elif kind == "video":
                src = item.get("video") if item.get("video") is not None else item.get("path")
                src = next(video_column, None) if src is None else src
                if src is None:
                    raise DataError(f"{where}: message {k + 1} has a video item without its frames, and the row's "
                                    f"'videos' column has no video left for it.")
                videos.append((src, video_rate(item, f"{where}, message {k + 1}")))
                items.append({"type": "video"})
            else:
                raise DataError(f"{where}: message {k + 1} has an item of type {kind!r}; use 'text', 'image', "
                                f"'audio' or 'video'.")
        out.append({"role": m["role"], "content": items})
    return out, sources, clips, videos


def _video_metadata(kwargs: dict, count: int) -> tuple[list, list]:
    """processor(..., video_metadata=[...]) -> (per video its fps or None, its frame indices or None). Raises
    DataError for a metadata list of another length, or a bad fps."""
    metadata = kwargs.get("video_metadata")
    if metadata is None:
        return [None] * count, [None] * count
    metadata = list(metadata) if isinstance(metadata, (list, tuple)) else [metadata]
    if len(metadata) != count:
        raise DataError(f"video_metadata has {len(metadata)} entries for {count} videos; give one per video.")
    field = lambda m, k: m.get(k) if isinstance(m, dict) else getattr(m, k, None)  # noqa: E731
    rates = [None if field(m, "fps") is None else positive_number(field(m, "fps"), f"video_metadata {i + 1}", "fps")
             for i, m in enumerate(metadata)]
    indices = [None if field(m, "frames_indices") is None else [float(x) for x in field(m, "frames_indices")]
               for m in metadata]
    return rates, indices
