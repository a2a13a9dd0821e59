"""Vision-language models: transformers' vision tower and projector in front of fasttune's decoder.

The vision tower (and its patch merger / projector) is transformers' own module, loaded from the checkpoint as
transformers loads it; the language model is our decoder with our kernels, built from the checkpoint's
`text_config`. `VisionCausalLM.forward` owns the glue: image features replace the image placeholder tokens of
the embedded sequence (as transformers' `masked_scatter` does), Qwen's 3-axis positions for multimodal RoPE come
from `qwen_vl_positions` (transformers' `get_rope_index` rule, for images), Qwen3-VL's DeepStack features are
added after its first decoder layers, Gemma 3's image tokens attend to each other both ways, and PaliGemma's prefix
(images and prompt, token_type_ids 0) attends both ways.

Parameter names inside the model: `model.*` (our decoder), `lm_head`, and the family's vision modules
(`visual.*` for Qwen, `vision_tower.*` and `multi_modal_projector.*` for Gemma 3). `checkpoint_name` maps them to
transformers' checkpoint names (`model.language_model.*` or, Idefics3, `model.text_model.*`, `model.visual.*`, ...),
which the saved adapters and
merged checkpoints use. What differs between the families is in models/vision_families.py.
"""
from __future__ import annotations

import re

import torch

from fasttune.constants import AUDIO_KEYS, CROSS_KEYS, VIDEO_KEYS
from fasttune.errors import ConfigError
from fasttune.models.causal_lm import CausalLM
from fasttune.models.vision_families import FAMILIES, VisionFamily
from fasttune.models.vision_features import (cross_image_inputs, image_geometry, internvl_features, llava_features,
                                             llava_next_features, pixtral_features, pooled_video_features,
                                             tile_features)
from fasttune.models.vision_positions import packed_positions, qwen_vl_positions
from fasttune.sharding import is_sharded, join_unused


def _joint_deepstack(parts: list):
    """[(token mask (B, T), [per-layer (tokens, H) features])] of images and videos -> (their joint mask,
    [per-layer features over the joint tokens in sequence order]) as transformers' Qwen3-VL joins them; None when
    there are none."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    joint = parts[0][0] | parts[1][0]
    layers = []
    for feats in zip(*(deep for _, deep in parts)):
        out = feats[0].new_zeros(int(joint.sum()), feats[0].shape[-1])
        for (mask, _), f in zip(parts, feats):
            out[mask[joint]] = f
        layers.append(out)
    return joint, layers


def is_vision_config(hf_config) -> bool:
    """True for a transformers config of a vision-language family fasttune runs (FAMILIES) whose language model our
    decoder runs (config.decoder_runs: a Gemma 4 attending both ways everywhere stays on the fallback)."""
    from fasttune.models.config import decoder_runs

    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gemma4":
        return decoder_runs(hf_config.text_config)
    return model_type in FAMILIES


class VisionCausalLM(CausalLM):
    """A vision-language model on our decoder: CausalLM(text_config) plus the family's vision modules.

    `config` is the language model's transformers config (what the decoder reads); `hf_config` is the whole
    vision-language config, which merged checkpoints are saved with."""

    def __init__(self, config):
        super().__init__(config)
        self.family: VisionFamily | None = None
        self._vlm_config = None

    def attach_vision(self, vlm_config, family: VisionFamily, modules: dict):
        """Install the vision modules (`{attribute: nn.Module}`, already on the model's device and dtype)."""
        self.family, self._vlm_config = family, vlm_config
        if family.prefix_lm:  # PaliGemma's prefix sees itself past a sliding window (ModelConfig.blocks_beyond_window)
            self.arch.blocks_beyond_window = True
        for attr, module in modules.items():
            module.requires_grad_(False)
            setattr(self, attr, module)

    @property
    def gradient_checkpointing(self) -> str | bool:
        """The recompute mode (CausalLM's); see the setter for the vision tower."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: str | bool):
        """Set the decoder's recompute mode (CausalLM's setter) and let the vision modules that train (LoRA on the
        tower, finetune_vision_layers) recompute their layers whenever the decoder recomputes: their saved activations
        (by a count of the saved values, ~1 GiB an image on Qwen2.5-VL-7B's tower at 448 x 448) would otherwise stay
        whatever the mode. transformers' own gradient checkpointing of the tower, non-reentrant (so the LoRA
        gradients flow without input grads)."""
        CausalLM.gradient_checkpointing.fset(self, mode)
        if self.family is None:
            return
        for attr, _ in self.family.vision_modules:
            module = getattr(self, attr, None)
            if not getattr(module, "supports_gradient_checkpointing", False):
                continue
            params = list(module.parameters())
            trains = any(p.requires_grad for p in params)
            on = trains and (mode in (True, "offload") or mode == "auto" and params[0].is_cuda)  # ("auto": as the
            # decoder resolves it outside the trainer)
            # (transformers 5.25 renamed the methods activation_checkpointing_*; 5.24 has only the old names)
            new = hasattr(module, "activation_checkpointing_enable")
            disable = module.activation_checkpointing_disable if new else module.gradient_checkpointing_disable
            if on:
                if new:
                    module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()):
                disable()

    @property
    def hf_config(self):
        """The whole vision-language config (before attach_vision: the language model's)."""
        return self._vlm_config if self._vlm_config is not None else self.config

    @hf_config.setter
    def hf_config(self, value):
        """Replace the vision-language config (the language model's before attach_vision)."""
        if self.family is None:
            self.config = value
        else:
            self._vlm_config = value

    @property
    def base_model(self) -> "VisionBackbone":
        """The backbone as transformers' vision-language models expose it: called with input_ids and the images,
        it returns the final hidden state (what TRL's fused LM head runs before projecting)."""
        return VisionBackbone(self)

    @property
    def image_token_id(self) -> int:
        """The id of the token each image feature replaces (config.image_token_id)."""
        return self._vlm_config.image_token_id

    @property
    def video_token_id(self) -> int | None:
        """The id of the token each video feature replaces (config.video_token_id), None for families without
        videos."""
        return getattr(self._vlm_config, "video_token_id", None) if self.family.video else None

    @property
    def audio_token_id(self) -> int | None:
        """The id of the token each audio feature replaces (config.audio_token_id) for a model with an audio tower
        (Gemma 4 E2B / E4B), else None."""
        return getattr(self._vlm_config, "audio_token_id", None) if self.hears else None

    @property
    def hears(self) -> bool:
        """Whether the model has an audio tower (Gemma 4 E2B / E4B)."""
        return getattr(self, "audio_tower", None) is not None

    def audio_features(self, input_features: torch.Tensor, input_features_mask: torch.Tensor) -> torch.Tensor:
        """Gemma 4's clips: log-mel frames (clips, frames, bins) with their mask (clips, frames) -> (audio tokens,
        hidden) features in the decoder's dtype, each clip's real (unpadded) soft tokens in order, as
        transformers' Gemma4Model.get_audio_features and its padding strip give them."""
        out = self.audio_tower(input_features.to(self.dtype), input_features_mask.bool(), return_dict=True)
        feats = self.embed_audio(inputs_embeds=out.last_hidden_state)
        return feats[out.attention_mask.bool()].to(self.dtype)

    @property
    def language_prefix(self) -> str:
        """transformers' name of the language model's modules in this family's checkpoints, with the dot
        (`model.language_model.`; Idefics3 / SmolVLM: `model.text_model.`)."""
        return f"model.{self.family.text_prefix}."

    def checkpoint_name(self, name: str) -> str:
        """Our parameter/module name -> transformers' name in this family's checkpoints."""
        if name.startswith("model."):
            return self.language_prefix + name[len("model."):]
        for attr, hf_name in self.family.vision_modules:
            if name == attr or name.startswith(attr + "."):
                return f"model.{hf_name}{name[len(attr):]}"
        return name

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw=None) -> tuple[torch.Tensor, list]:
        """The processor's pixel_values (Qwen: patches (P, C*T*P*P) with image_grid_thw (images, 3); Gemma 3:
        images (N, C, H, W); Mistral 3: padded images (N, C, H, W) with their sizes (N, 2) in image_grid_thw's
        place; Idefics3 / SmolVLM: tiles (tiles, C, H, W) with their pixel_attention_mask (tiles, H, W) or None in
        its place; InternVL: patches (patches, C, H, W); LLaVA: images (N, C, H, W); LLaVA-NeXT: tiles (N, tiles,
        C, H, W) with image_sizes (N, 2) in image_grid_thw's place; see models/vision_features.py)
        -> ((image tokens, hidden) features in the decoder's dtype, images in order; Qwen3-VL's
        DeepStack features, one (image tokens, hidden) tensor per early decoder layer, else [])."""
        if self.family.sized_images:
            return pixtral_features(self, pixel_values, image_grid_thw), []
        if self.family.tiles:
            return tile_features(self, pixel_values, image_grid_thw), []
        if self.family.shuffled_patches:
            return internvl_features(self, pixel_values), []
        if self.family.anyres:
            return llava_next_features(self, pixel_values, image_grid_thw), []
        if self.family.layer_features:
            return llava_features(self, pixel_values), []
        if self.family.positioned_patches:  # Gemma 4: the tower drops the padding patches and pools the rest
            hidden = self.vision_tower(pixel_values=pixel_values.to(self.dtype),
                                       pixel_position_ids=image_grid_thw).last_hidden_state
            return self.embed_vision(inputs_embeds=hidden).reshape(-1, self.config.hidden_size).to(self.dtype), []
        if self.family.prefix_lm:  # PaliGemma: every patch's last hidden state through the linear projector
            weight = self.multi_modal_projector.linear.weight
            hidden = self.vision_tower(pixel_values=pixel_values.to(weight.dtype)).last_hidden_state
            return self.multi_modal_projector(hidden).reshape(-1, self.config.hidden_size).to(self.dtype), []
        if self.family.model_type == "gemma3":
            tower = self.vision_tower
            hidden = tower(pixel_values=pixel_values.to(self.multi_modal_projector.mm_input_projection_weight.dtype)
                           ).last_hidden_state
            return self.multi_modal_projector(hidden).reshape(-1, self.config.hidden_size).to(self.dtype), []
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers < 5.x returns a tensor
        deep = [f.to(self.dtype) for f in getattr(out, "deepstack_features", None) or []]
        return feats.to(self.dtype), deep

    def multimodal_inputs(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None,
                          attention_mask=None, videos: dict | None = None, segment_ids=None,
                          token_type_ids=None) -> dict:
        """What the decoder gets for a prompt with images and videos: inputs_embeds (B, T, H) (see embed),
        position_ids ((3, B, T) for multimodal RoPE, else None), image_blocks (Gemma 3's two-way image attention,
        else None), deepstack ((visual-token mask (B, T), [per-layer features]) for Qwen3-VL, else None) and
        rope_deltas (B, 1) (what generation adds to the positions of the tokens after the prompt). videos: the
        processor's pixel_values_videos, video_grid_thw and (Qwen2.5-VL) second_per_grid_ts (VIDEO_KEYS);
        segment_ids (B, T): packed rows' documents (1, 2, ...; padding 0), each of which gets its own multimodal
        positions. Llama 3.2 Vision (family.cross_attention): the text's own embeddings, and `cross`, its
        cross-attention layers' image inputs (vision_features.cross_image_inputs; its aspect-ratio inputs in `videos`
        under their processor keys, constants.CROSS_KEYS). token_type_ids (B, T): PaliGemma's prefix (0) and suffix (1),
        whose prefix attends both ways (image_blocks)."""
        if self.family.cross_attention:
            zeros = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
            return {"inputs_embeds": self._joined(self.model.embed_tokens(input_ids)), "position_ids": None,
                    "rope_deltas": zeros, "image_blocks": None, "deepstack": None, "per_layer_ids": None,
                    "cross": cross_image_inputs(self, input_ids, pixel_values, videos or {}, segment_ids)}
        x, deep = self.embed(input_ids, pixel_values, image_grid_thw, with_deepstack=True, videos=videos)
        x = self._joined(x)
        if segment_ids is not None and self.family.mrope:
            positions, deltas = self.packed_rope_index(input_ids, segment_ids, image_grid_thw, videos)
        else:
            positions, deltas = self.rope_index(input_ids, image_grid_thw, attention_mask, videos)
        per_layer_ids = None
        if self.arch.per_layer_input_size:  # Gemma 4 E2B / E4B: image and audio positions look up the pad token's row
            pad = self.arch.pad_token_id or 0
            media = input_ids == self.image_token_id
            for other in (self.audio_token_id, self.video_token_id):
                if other is not None:
                    media = media | (input_ids == other)
            per_layer_ids = input_ids.masked_fill(media, pad)
        blocks = self.image_blocks(input_ids, token_type_ids) if self.family.prefix_lm or pixel_values is not None or \
            (videos or {}).get("pixel_values_videos") is not None else None
        return {"inputs_embeds": x, "position_ids": positions, "rope_deltas": deltas, "image_blocks": blocks,
                "deepstack": deep, "per_layer_ids": per_layer_ids, "cross": None}

    def _joined(self, x: torch.Tensor) -> torch.Tensor:
        """x, joined under FSDP (with grad) to every trainable parameter of the vision modules (sharding.join_unused):
        a rank whose batch has no images, videos or audio still sends their (zero) gradients."""
        if not (torch.is_grad_enabled() and is_sharded(self)):
            return x
        return join_unused(x, [getattr(self, attr, None) for attr, _ in self.family.vision_modules])

    def with_images(self, input_ids, pixel_values, image_grid_thw, attention_mask, position_ids, kwargs: dict):
        """(inputs_embeds, position_ids) for the decoder from input_ids and their images and videos
        (multimodal_inputs; the video keys are popped from `kwargs`); the decoder's image_blocks / deepstack keywords
        are added to `kwargs` unless given. Given position_ids win, but for a packed row's (segment_ids in `kwargs`)
        on a family with multimodal RoPE: their per-document plain positions are replaced by each document's
        multimodal ones."""
        videos = {k: kwargs.pop(k) for k in (*VIDEO_KEYS, *AUDIO_KEYS, *CROSS_KEYS) if k in kwargs}
        segments = kwargs.get("segment_ids")
        inputs = self.multimodal_inputs(input_ids, pixel_values, image_grid_thw, attention_mask, videos, segments,
                                        kwargs.pop("token_type_ids", None))
        if segments is not None and self.family.mrope and position_ids is not None and position_ids.dim() == 2:
            position_ids = None
        for key in ("image_blocks", "deepstack", "per_layer_ids", "cross"):
            if kwargs.get(key) is None:
                kwargs[key] = inputs[key]
        return inputs["inputs_embeds"], inputs["position_ids"] if position_ids is None else position_ids

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None, with_deepstack: bool = False,
              videos: dict | None = None):
        """Token embeddings (B, T, H) with each image's and video's features in place of its placeholder tokens
        (and, with with_deepstack, Qwen3-VL's DeepStack input as a second value: (visual-token mask (B, T), one
        (visual tokens, H) tensor per early decoder layer, images and videos in sequence order), or None). Videos
        go through the same vision tower as images (transformers' get_video_features). Raises ConfigError when
        placeholder tokens come without their pixels, when their number differs from the features the pixels give
        (a row cut inside an image, or grids that do not belong to these ids), or for videos on a family without
        them."""
        is_image = input_ids == self.image_token_id
        ids = input_ids.masked_fill(is_image, 0) if self.image_token_id >= self.arch.vocab_size else input_ids
        x = self.model.embed_tokens(ids)  # an image token outside the vocabulary (Gemma 3) embeds as id 0
        videos = {k: v for k, v in (videos or {}).items() if v is not None}
        audio = [videos.pop(k, None) for k in AUDIO_KEYS]
        if videos and self.video_token_id is None:
            raise ConfigError(f"{self.family.model_type} takes no videos (pixel_values_videos was passed); pass its "
                              f"frames as images.")
        x = self._with_audio(x, input_ids, *audio)
        parts = [("image", "pixel_values", is_image, pixel_values, image_grid_thw)]
        if self.video_token_id is not None:
            geometry = videos.get("video_grid_thw", videos.get("video_position_ids"))  # (Gemma 4: positions)
            parts.append(("video", "pixel_values_videos", input_ids == self.video_token_id,
                          videos.get("pixel_values_videos"), geometry))
        deep_parts = []
        for what, key, mask, pixels, grid in parts:
            pooled = what == "video" and self.family.video == "pooled"  # (LLaVA-OneVision: frames of one size)
            if pixels is None:
                if bool(mask.any()):
                    raise ConfigError(f"input_ids hold {what} placeholder tokens but no {key} were passed; pass "
                                      f"the processor's {key} with their geometry ({what}_grid_thw, image_sizes or "
                                      f"{what}_position_ids) with them.")
                continue
            if pooled:
                feats, deep = pooled_video_features(self, pixels, videos.get("num_frames_per_video")), []
            elif grid is None and self.family.mrope:
                raise ConfigError(f"{key} need {what}_grid_thw ({what}s, 3), as the processor returns them.")
            elif grid is None and (self.family.sized_images or self.family.anyres):
                raise ConfigError(f"{key} need image_sizes (images, 2), each image's (height, width) as the "
                                  f"processor returns them.")
            elif grid is None and self.family.positioned_patches:
                raise ConfigError(f"{key} need {what}_position_ids ({what == 'image' and 'images' or 'frames'}, "
                                  f"patches, 2), each patch's (x, y) as the processor returns them.")
            else:
                feats, deep = self.image_features(pixels, grid)
            n_tokens = int(mask.sum())
            if n_tokens != feats.shape[0]:
                one = "an image" if what == "image" else "a video"
                raise ConfigError(f"The batch holds {n_tokens} {what} placeholder tokens but its {what}s give "
                                  f"{feats.shape[0]} features: a row was cut inside {one} (raise max_seq_length) "
                                  f"or {key}/{what}_grid_thw do not belong to these input_ids.")
            x = x.masked_scatter(mask[..., None].expand_as(x), feats)
            if deep:
                deep_parts.append((mask, deep))
        return (x, _joint_deepstack(deep_parts)) if with_deepstack else x

    def _with_audio(self, x: torch.Tensor, input_ids: torch.Tensor, features=None, mask=None) -> torch.Tensor:
        """x (B, T, H) with the clips' features (audio_features) in place of the audio tokens. Raises ConfigError for
        audio on a model without an audio tower, features without their mask, audio tokens without features, or
        counts that differ (a row cut inside a clip)."""
        if features is None:
            if self.audio_token_id is not None and bool((input_ids == self.audio_token_id).any()):
                raise ConfigError("input_ids hold audio placeholder tokens but no input_features were passed; pass "
                                  "the processor's input_features and input_features_mask with them.")
            return x
        if not self.hears:
            raise ConfigError(f"This {self.family.model_type} model has no audio tower (only Gemma 4 E2B / E4B "
                              f"checkpoints hear); input_features were passed.")
        if mask is None:
            raise ConfigError("input_features need input_features_mask (clips, frames), as the processor returns it.")
        feats = self.audio_features(features, mask)
        is_audio = input_ids == self.audio_token_id
        if int(is_audio.sum()) != feats.shape[0]:
            raise ConfigError(f"The batch holds {int(is_audio.sum())} audio placeholder tokens but its clips give "
                              f"{feats.shape[0]} features: a row was cut inside a clip (raise max_seq_length) or "
                              f"input_features do not belong to these input_ids.")
        return x.masked_scatter(is_audio[..., None].expand_as(x), feats)

    def image_blocks(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """(B, T) long: each image's (Gemma 4: and video frame's) run of placeholder tokens numbered 0, 1, ... per
        row, text -1, for families whose image tokens attend both ways (transformers' get_block_sequence_ids_for_mask);
        PaliGemma's prefix (token_type_ids 0) as block 0 and its suffix -1, as transformers' PaliGemmaModel builds its
        mask (without token_type_ids the whole row is the prefix, as there: its text config asks for two-way
        attention); else None."""
        if self.family.prefix_lm:
            if token_type_ids is None:
                return torch.zeros_like(input_ids)
            return torch.where(token_type_ids.to(input_ids.device) == 0, 0, -1)
        if not self.family.bidirectional_images:
            return None
        is_image = input_ids == self.image_token_id
        if self.video_token_id is not None and self.family.video == "positioned":
            is_image = is_image | (input_ids == self.video_token_id)
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)

    def rope_index(self, input_ids: torch.Tensor, image_grid_thw=None, attention_mask=None,
                   videos: dict | None = None):
        """((3, B, T) multimodal RoPE positions, (B, 1) deltas for the tokens after them), see qwen_vl_positions;
        (None, zeros) for families with plain positions. videos: as in multimodal_inputs."""
        if not self.family.mrope:
            return None, torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        merge = self._vlm_config.vision_config.spatial_merge_size
        videos = videos or {}
        grids, intervals = videos.get("video_grid_thw"), None
        if grids is not None and self.family.video == "frames":  # each frame its own grid of one frame
            grids = torch.repeat_interleave(grids, grids[:, 0], dim=0)
            grids[:, 0] = 1
        elif grids is not None and self.family.video == "scaled":
            per_grid = videos.get("second_per_grid_ts")
            per_grid = [1.0] * len(grids) if per_grid is None else torch.as_tensor(per_grid).tolist()
            tokens_per_second = self._vlm_config.vision_config.tokens_per_second
            intervals = [tokens_per_second * t for t in per_grid]
        return qwen_vl_positions(input_ids, image_grid_thw, attention_mask, self.image_token_id, merge,
                                 self.video_token_id, grids, intervals)

    def packed_rope_index(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, image_grid_thw=None,
                          videos: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rope_index for packed rows (models/vision_positions.py: packed_positions): each document its own positions;
        zero (B, 1) deltas (packed rows are not generated from)."""
        positions = packed_positions(lambda ids, mask: self.rope_index(ids, image_grid_thw, mask, videos)[0],
                                     input_ids, segment_ids)
        return positions, torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None,
                token_type_ids=None, image_sizes=None, image_position_ids=None, pixel_attention_mask=None,
                batch_num_images=None, **kwargs):
        """CausalLM.forward plus the image and video inputs the processor returns: pixel_values (patches,
        C*T*P*P), image_grid_thw (images, 3) (Qwen); images (N, C, H, W) with image_sizes (N, 2) (Mistral 3);
        image tiles (tiles, C, H, W) with pixel_attention_mask (tiles, H, W) (Idefics3 / SmolVLM; transformers'
        (B, images, ...) layout too); tiles (N, tiles, C, H, W) with image_sizes and, LLaVA-OneVision, batch_num_images
        (rows,) (LLaVA-NeXT / -OneVision);
        pixel_values_videos, video_grid_thw (videos, 3) and
        second_per_grid_ts (videos,) (Qwen2.5-VL) as keywords (VIDEO_KEYS); Llama 3.2 Vision's images per row (B,
        images, tiles, C, H, W) with aspect_ratio_ids, aspect_ratio_mask and optionally cross_attention_mask as
        keywords (CROSS_KEYS); token_type_ids: PaliGemma's prefix (0, attending both ways) and suffix (1), as
        PaliGemmaProcessor returns them (without them the whole row is the prefix, as in transformers);
        mm_token_type_ids, and token_type_ids for the other families, are accepted and unused (image and video
        tokens are found by id; Gemma 3's images attend within themselves both ways, as with its token_type_ids).
        Positions default to the multimodal RoPE positions of input_ids. See CausalLM.forward for the rest."""
        if inputs_embeds is None and input_ids is not None and past_key_values is None:
            geometry = image_geometry(image_grid_thw, image_sizes, image_position_ids, pixel_attention_mask,
                                      batch_num_images)
            kwargs["token_type_ids"] = token_type_ids  # (PaliGemma's prefix; with_images takes it)
            inputs_embeds, position_ids = self.with_images(input_ids, pixel_values, geometry, attention_mask,
                                                           position_ids, kwargs)
            input_ids = None
        elif self.family.prefix_lm and input_ids is not None and getattr(past_key_values, "length", None) == 0:
            kwargs.setdefault("image_blocks", self.image_blocks(input_ids, token_type_ids))  # (a prompt without
            # images into an empty cache: PaliGemma's prefix too)
        elif pixel_values is not None or kwargs.get("pixel_values_videos") is not None or \
                kwargs.get("input_features") is not None:
            raise ConfigError("pixel_values, pixel_values_videos and input_features go with the first forward pass "
                              "over the prompt's input_ids, not with inputs_embeds or a filled KV cache.")
        for key in (*VIDEO_KEYS, *AUDIO_KEYS, *CROSS_KEYS):  # None (or consumed above; Llama 3.2 Vision's decode
            kwargs.pop(key, None)  # steps use the prompt's last cross-attention mask row, kept in the KV cache)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, **kwargs)


class VisionBackbone:
    """VisionCausalLM's decoder with the image inputs in front: `backbone(input_ids, attention_mask=...,
    pixel_values=..., image_grid_thw=...)` -> BaseModelOutput with `.last_hidden_state` (B, T, H), as transformers'
    Qwen2_5_VLModel / Gemma3Model return it. Not a module of its own (it holds no weights)."""

    def __init__(self, model: VisionCausalLM):
        self.model = model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, pixel_values=None,
                 image_grid_thw=None, mm_token_type_ids=None, token_type_ids=None, image_sizes=None,
                 image_position_ids=None, pixel_attention_mask=None, batch_num_images=None, **kwargs):
        m = self.model
        if inputs_embeds is None and input_ids is not None:
            geometry = image_geometry(image_grid_thw, image_sizes, image_position_ids, pixel_attention_mask,
                                      batch_num_images)
            kwargs["token_type_ids"] = token_type_ids  # (PaliGemma's prefix; with_images takes it)
            inputs_embeds, position_ids = m.with_images(input_ids, pixel_values, geometry, attention_mask,
                                                        position_ids, kwargs)
        return m.model(None, attention_mask, position_ids, None, inputs_embeds, **kwargs)


def vision_targets(model: VisionCausalLM, vision: bool, language: bool, attention: bool, mlp: bool,
                   attention_names, mlp_names, audio: bool = False) -> str:
    """The target_modules regex for FastModel's layer-group switches on a vision-language model, over
    transformers' module names (what PEFT matches; LoRA resolves it through checkpoint_name); attention_names /
    mlp_names: the decoder's projection names; `audio`: finetune_audio_layers (the audio tower's attention / MLP
    linears by the same two switches, and its embedder's projection; the vision switch likewise adds the vision
    embedder's projection where the family has one, as the peer does). Raises ConfigError when nothing is selected,
    or for audio=True on a model without an audio tower."""
    from fasttune.peft.lora import latent_attention_targets

    parts, lm = [], re.escape(model.language_prefix)
    if model.arch.kv_lora_rank:  # Mistral Small 4's latent attention: its projections in place of q/k/v
        attention_names = latent_attention_targets(model.arch) + ["o_proj"]
    if language:
        names = (list(attention_names) if attention else []) + (list(mlp_names) if mlp else [])
        if names:
            # (Llama 3.2 Vision's cross-attention layers: cross_attn, its projections named as self-attention's)
            parts.append(rf"{lm}layers\.\d+\.(self_attn|cross_attn|mlp)\.({'|'.join(names)})")
        if mlp and model.arch.shared_expert_size:  # Qwen3.5-MoE's shared expert, Mistral 4's shared_experts (the
            shared = model.arch.module_name("shared_expert")  # routed ones: target_parameters)
            parts.append(rf"{lm}layers\.\d+\.mlp\.{shared}\.({'|'.join(mlp_names)})")
        if attention and model.arch.linear_layers:  # Qwen3.5's linear-attention layers
            from fasttune.peft.lora import LINEAR_ATTENTION_TARGETS

            parts.append(rf"{lm}layers\.\d+\.linear_attn\.({'|'.join(LINEAR_ATTENTION_TARGETS)})")
    fam = model.family
    if vision:
        parts += ([fam.vision_attention_targets] if attention else []) + ([fam.vision_mlp_targets] if mlp else [])
        parts += [fam.vision_projection_targets] if fam.vision_projection_targets else []
    if audio:
        if not model.hears or fam.audio_attention_targets is None:
            raise ConfigError(f"finetune_audio_layers=True: this {fam.model_type} model has no audio tower (only "
                              f"Gemma 4 E2B / E4B checkpoints hear). Set finetune_audio_layers=False.")
        parts += ([fam.audio_attention_targets] if attention else []) + ([fam.audio_mlp_targets] if mlp else [])
        parts.append(fam.audio_projection_targets)
    if not parts:
        raise ConfigError("get_peft_model: finetune_vision_layers / finetune_language_layers / "
                          "finetune_audio_layers / finetune_attention_modules / finetune_mlp_modules select no "
                          "layers, so nothing would train. Enable the language, vision and/or audio layers with "
                          "attention and/or MLP modules.")
    from fasttune.peft.lora import is_quantized

    names = [model.checkpoint_name(n) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or is_quantized(m)]
    for p in parts:  # every asked-for group must find its layers (module names move between transformers versions)
        if not any(re.fullmatch(p, n) for n in names):
            raise ConfigError(f"get_peft_model: no layer of this {model.family.model_type} model matches {p!r}; this "
                              f"transformers version names the layers differently. Pass target_modules yourself.")
    return "|".join(f"({p})" for p in parts)
