"""VisionProcessor's placeholder settings (data/vision.py) for a vision-language checkpoint's config: which tokens an
image, clip or video becomes and how, per family, as transformers' processors expand them."""
from __future__ import annotations

import re

from fasttune.errors import ModelLoadError


def processor_settings(vlm_config, tokenizer) -> dict:
    """VisionProcessor's placeholder settings for a vision-language config: Qwen2.5-VL's one <|image_pad|> per
    merged patch, Gemma 3's fixed image sequence (Gemma3Processor's full_image_sequence), Gemma 4's soft tokens,
    Pixtral's rows, Llama 3.2 Vision's one <|image|> (its images batched per row),
    Idefics3's tiles (image_seq_len tokens a tile: (image_size / patch_size)^2 / scale_factor^2, as
    Idefics3Model computes it), InternVL's patch spans ((image_size / patch_size)^2 x downsample_ratio^2 tokens a
    patch, InternVLProcessor's image_seq_length), LLaVA-NeXT's / LLaVA-OneVision's tiles
    (data/vision_layouts.py's anyres_token_count), or PaliGemma's (image_size / patch_size)^2 an image with its
    prefix-LM layout and its template (PALIGEMMA_TEMPLATE, where the checkpoint has none)."""
    if vlm_config.model_type == "gemma3":
        boi, eoi, soft = _tokens_of(tokenizer, vlm_config, "boi_token_id", "eoi_token_id", "image_token_id")
        return dict(image_token=boi, merge_size=None, feature_token=soft,
                    image_sequence=f"\n\n{boi}{soft * vlm_config.mm_tokens_per_image}{eoi}\n\n")
    if vlm_config.model_type == "gemma4":  # Gemma4Processor: <image> -> begin mark, soft tokens, end mark
        boi, eoi, image = _tokens_of(tokenizer, vlm_config, "boi_token_id", "eoi_token_id", "image_token_id")
        settings = dict(image_token=image, merge_size=None, soft_token_marks=(boi, eoi))
        if getattr(vlm_config, "audio_config", None) is not None:  # E2B / E4B hear: <audio> expands alike
            settings["audio_marks"] = tuple(tokenizer.convert_ids_to_tokens(
                [vlm_config.boa_token_id, vlm_config.audio_token_id, vlm_config.eoa_token_index]))
        video = getattr(vlm_config, "video_token_id", None)
        if video is not None and video < len(tokenizer):  # frames as images between timestamps (data/video.py)
            settings["video_token"] = tokenizer.convert_ids_to_tokens(video)
        return settings
    if vlm_config.model_type == "mistral3":  # PixtralProcessor's tokens; a token covers merge x merge patches
        image = _token_of(tokenizer, vlm_config.image_token_id)
        side = vlm_config.vision_config.patch_size * vlm_config.spatial_merge_size
        return dict(image_token=image, merge_size=None,
                    image_rows=(_special(tokenizer, "[IMG_BREAK]"), _special(tokenizer, "[IMG_END]"), side))
    if vlm_config.model_type == "mllama":  # MllamaProcessor: <|image|> stays one token; the images go per row
        image = _token_of(tokenizer, vlm_config.image_token_index, "image_token_index")
        return dict(image_token=image, merge_size=None, image_sequence=image, cross_images=True)
    if vlm_config.model_type == "llava":  # LlavaProcessor: one <image> per patch (and the class token, if kept)
        vision = vlm_config.vision_config
        count = (vision.image_size // vision.patch_size) ** 2 + \
            (vlm_config.vision_feature_select_strategy != "default")
        image = _token_of(tokenizer, vlm_config.image_token_id)
        return dict(image_token=image, merge_size=None, image_sequence=image * count)
    if vlm_config.model_type in ("llava_next", "llava_onevision"):  # an <image> per feature of the image's tiles
        vision = vlm_config.vision_config
        strategy, with_class = vlm_config.vision_feature_select_strategy, vision.model_type == "clip_vision_model"
        if (strategy == "default") != with_class:
            raise ModelLoadError(f"This {vlm_config.model_type} config takes its features with the '{strategy}' "
                                 f"strategy from a {vision.model_type} tower; fasttune runs it with 'default' on a "
                                 f"tower with a class token (CLIP) or 'full' on one without (SigLIP), where every tile "
                                 f"gives (image_size / patch_size)^2 features, as its released checkpoints do.")
        image = _token_of(tokenizer, vlm_config.image_token_id)
        pinpoints = tuple(tuple(int(v) for v in p) for p in vlm_config.image_grid_pinpoints)
        most = getattr(vlm_config, "vision_aspect_ratio", None)  # LLaVA-OneVision's "anyres_max_N"
        settings = dict(image_token=image, merge_size=None,
                        anyres=(pinpoints, vision.image_size, vision.patch_size, anyres_max(most)))
        video = getattr(vlm_config, "video_token_id", None)
        if vlm_config.model_type == "llava_onevision" and video is not None and video < len(tokenizer):
            # frames of the tower's size (unless video_preprocessor_config.json says otherwise), each pooled
            settings["video_token"] = tokenizer.convert_ids_to_tokens(video)
            settings["video_default"] = {"height": vision.image_size, "width": vision.image_size,
                                         "pooled": vision.image_size // vision.patch_size, "do_sample_frames": False}
        return settings
    if vlm_config.model_type == "internvl":  # InternVLProcessor: <img>, <IMG_CONTEXT> per patch token, </img>
        vision = vlm_config.vision_config
        side = _side(vision.image_size) // _side(vision.patch_size)
        per_patch = round(side * side * vlm_config.downsample_ratio ** 2)
        image = _token_of(tokenizer, vlm_config.image_token_id)
        return dict(image_token=image, merge_size=None,
                    patch_span=(_special(tokenizer, "<img>"), _special(tokenizer, "</img>"), per_patch))
    if vlm_config.model_type == "aya_vision":  # AyaVisionProcessor: per tile its tokens (pixel-shuffled patches)
        vision = vlm_config.vision_config
        side = _side(vision.image_size) // _side(vision.patch_size) // vlm_config.downsample_factor
        image = _token_of(tokenizer, vlm_config.image_token_index, "image_token_index")
        return dict(image_token="<image>", merge_size=None, feature_token=image,
                    aya_tiles=(_special(tokenizer, "<|START_OF_IMG|>"), _special(tokenizer, "<|END_OF_IMG|>"), "TILE",
                               "TILE_GLOBAL", side * side))
    if vlm_config.model_type == "paligemma":  # PaliGemmaProcessor: an <image> per patch, then <bos>, prompt, "\n"
        vision = vlm_config.vision_config
        count = (_side(vision.image_size) // _side(vision.patch_size)) ** 2
        image = _token_of(tokenizer, vlm_config.image_token_id)
        return dict(image_token=image, merge_size=None, image_sequence=image * count, prefix_lm=True,
                    default_template=PALIGEMMA_TEMPLATE.replace("<image>", image))
    if vlm_config.model_type in ("idefics3", "smolvlm"):  # Idefics3Processor's tiles (data/vision.py)
        vision = vlm_config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 // vlm_config.scale_factor ** 2
        image = _token_of(tokenizer, vlm_config.image_token_id)
        return dict(image_token=image, merge_size=None,
                    image_tiles=(_special(tokenizer, "<fake_token_around_image>"), _special(tokenizer, "<global-img>"),
                                 per_tile))
    settings = dict(image_token="<|image_pad|>", merge_size=vlm_config.vision_config.spatial_merge_size)
    video = getattr(vlm_config, "video_token_id", None)
    if vlm_config.model_type in QWEN_VIDEO_TYPES and video is not None and video < len(tokenizer):
        settings["video_token"] = tokenizer.convert_ids_to_tokens(video)  # (data/video.py reads their frames)
        if vlm_config.model_type in QWEN3_VIDEO_TYPES:  # timestamped frames between the vision marks
            settings["video_stamps"] = tuple(tokenizer.convert_ids_to_tokens(
                [vlm_config.vision_start_token_id, vlm_config.vision_end_token_id]))
    return settings


# PaliGemma's checkpoints have no chat template: a conversation is laid out as PaliGemmaProcessor lays out a prompt and
# its suffix: the user turn's images (their placeholders) first, then <bos>, its text and "\n" (the prefix, which
# attends both ways); the assistant's text and <eos> (the suffix, the only target)
PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set items = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- for item in items -%}{%- if item['type'] == 'image' -%}<image>{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{%- for item in items -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- for item in items -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}"
    "{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}")

QWEN3_VIDEO_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # Qwen3VLProcessor's families
QWEN_VIDEO_TYPES = ("qwen2_vl", "qwen2_5_vl") + QWEN3_VIDEO_TYPES


def anyres_max(vision_aspect_ratio: str | None) -> int | None:
    """LLaVA-OneVision's vision_aspect_ratio "anyres_max_N" -> N, the most tiles' worth of features an image's grid
    keeps (more are interpolated down); None (LLaVA-NeXT) keeps them all. ModelLoadError for another form."""
    if vision_aspect_ratio is None:
        return None
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None:
        raise ModelLoadError(f"vision_aspect_ratio '{vision_aspect_ratio}' is not of the form anyres_max_N, the one "
                             f"transformers' LLaVA-OneVision reads.")
    return int(match.group(1))


def _token_of(tokenizer, token_id: int, field: str = "image_token_id") -> str:
    """The tokenizer's token of the config's `field` (a token id); ModelLoadError naming the field when the
    tokenizer has no such id."""
    token = tokenizer.convert_ids_to_tokens(token_id) if token_id is not None and token_id < len(tokenizer) else None
    if token is None:
        raise ModelLoadError(f"The config's {field} {token_id} is not a token of this tokenizer "
                             f"({len(tokenizer)} tokens); use the checkpoint's own tokenizer.")
    return token


def _tokens_of(tokenizer, config, *fields: str) -> list[str]:
    """The tokenizer's tokens of the config's token-id `fields`, each checked by _token_of."""
    return [_token_of(tokenizer, getattr(config, f), f) for f in fields]


def _side(size) -> int:
    """A square size given as an int or as [height, width] (InternVL's vision config)."""
    return int(size if isinstance(size, int) else size[0])


def _special(tokenizer, token: str) -> str:
    """`token` when the tokenizer has it as one token; else ModelLoadError naming it (Pixtral's row marks,
    Idefics3's tile marks)."""
    if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
        raise ModelLoadError(f"The tokenizer has no {token} token, which this model's images need (its processor "
                             f"writes it); use the checkpoint's own tokenizer.")
    return token
