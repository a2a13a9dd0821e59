"""The vision-language families fasttune runs, and what differs between them (`VisionFamily`): which modules of
transformers' model are the vision side, the PEFT target regexes of its tower, and the flags models/vision.py and
models/vision_features.py read (multimodal RoPE, two-way image attention, DeepStack, videos, images by size, tiles,
patches, tower layers, anyres grids). Keyed by transformers' model_type.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VisionFamily:
    """What differs between vision-language families. `vision_modules`: our attribute -> transformers' name
    under `model.`; `*_targets`: regexes (transformers' checkpoint names, as PEFT matches them) of the vision
    tower's attention / MLP linears for finetune_vision_layers; `mrope`: Qwen's 3-axis positions;
    `bidirectional_images`: an image's tokens see each other both ways (Gemma 3); `deepstack`: Qwen3-VL's
    DeepStack features (see VisionCausalLM.multimodal_inputs). (Gemma's text embeddings are scaled inside
    embed_tokens, models/word_embedding.py, before the image features go in.)"""
    model_type: str
    vision_modules: tuple
    vision_attention_targets: str
    vision_mlp_targets: str
    mrope: bool = False
    bidirectional_images: bool = False
    deepstack: bool = False  # Qwen3-VL: features of inner vision layers are added after the first decoder layers
    # How a video's grid takes positions (None: the family takes no videos): "plain" (Qwen2-VL: like an image of t
    # frames), "scaled" (Qwen2.5-VL: frame index x tokens_per_second x second_per_grid_ts), "frames" (Qwen3-VL,
    # Qwen3.5: each frame its own grid, the processor's timestamps as text between them), "positioned" (Gemma 4: each
    # frame's patches with their positions, as images; plain positions in the decoder), "pooled" (LLaVA-OneVision:
    # each frame's features pooled 2 x 2, a newline feature after each video; plain positions)
    video: str | None = None
    # Pixtral (Mistral 3): images of any size, each given by its (height, width) in pixels (the processor's
    # image_sizes), whose features come from a chosen tower layer through the patch-merging projector
    sized_images: bool = False
    # Gemma 4: each image comes as padded patches with their (x, y) positions (the processor's image_position_ids,
    # -1 = padding), its features from the tower's last hidden state through the embedder (embed_vision)
    positioned_patches: bool = False
    # finetune_audio_layers (Gemma 4 E2B / E4B): regexes of the audio tower's attention and feed-forward /
    # convolution-module linears, and of the linears between a tower and the decoder (the embedders' projections),
    # which the vision / audio switch adds as the peer's get_peft_model does
    audio_attention_targets: str | None = None
    audio_mlp_targets: str | None = None
    vision_projection_targets: str | None = None
    audio_projection_targets: str | None = None
    # Idefics3 (SmolVLM): each image comes as square tiles (a grid of crops plus the whole image resized), each tile
    # of fixed size through the tower (with its pixel_attention_mask) and the pixel-shuffle connector
    tiles: bool = False
    # the language model's module under transformers' `model.` (Idefics3 / SmolVLM: text_model)
    text_prefix: str = "language_model"
    # InternVL: each image as patches (crops and a thumbnail) through the tower, its class token dropped, the patch
    # features pixel-shuffled by downsample_ratio before the projector
    shuffled_patches: bool = False
    # LLaVA: a fixed-size image's features from the tower layer(s) vision_feature_layer through the projector
    layer_features: bool = False
    # LLaVA-NeXT: each image as its grid of fixed-size tiles plus the whole image (the processor's image_sizes give the
    # grid), the grid's features cut back to the image's aspect ratio with a learned newline a row
    anyres: bool = False
    # Llama 3.2 Vision (transformers' MllamaForConditionalGeneration): no image features in the text; each image (up
    # to max_num_tiles tiles, with its aspect-ratio id) goes through the tower and the projector into the decoder's
    # cross-attention layers (models/cross_attention.py), its one <|image|> token marking where the text starts
    # attending to it
    cross_attention: bool = False
    # PaliGemma (transformers' PaliGemmaForConditionalGeneration): prefix-LM attention, the prefix (the images and the
    # prompt: token_type_ids 0) seeing itself both ways and the suffix (the answer) causally; the tower's last hidden
    # state through a one-linear projector
    prefix_lm: bool = False


FAMILIES = {
    "qwen2_5_vl": VisionFamily("qwen2_5_vl", (("visual", "visual"),),
                               r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
                               r"model\.visual\.blocks\.\d+\.mlp\.(gate_proj|up_proj|down_proj)", mrope=True,
                               video="scaled"),
    "qwen2_vl": VisionFamily("qwen2_vl", (("visual", "visual"),),
                             r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
                             r"model\.visual\.blocks\.\d+\.mlp\.(fc1|fc2)", mrope=True, video="plain"),
    "qwen3_vl": VisionFamily("qwen3_vl", (("visual", "visual"),),
                             r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
                             r"model\.visual\.blocks\.\d+\.mlp\.(linear_fc1|linear_fc2)", mrope=True, deepstack=True,
                             video="frames"),
    # SigLIP tower + Gemma 3's projector (avg-pool, norm, projection): transformers' Gemma3ForConditionalGeneration
    "gemma3": VisionFamily("gemma3", (("vision_tower", "vision_tower"),
                                      ("multi_modal_projector", "multi_modal_projector")),
                           r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.self_attn\."
                           r"(q_proj|k_proj|v_proj|out_proj)",
                           r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.mlp\.(fc1|fc2)",
                           bidirectional_images=True),
    # Pixtral tower + Mistral 3's projector (norm, 2 x 2 patch merger, two linears): Mistral Small 3.1 / 3.2,
    # Magistral Small, Devstral Small 2 and Ministral 3 (transformers' Mistral3ForConditionalGeneration)
    "mistral3": VisionFamily("mistral3", (("vision_tower", "vision_tower"),
                                          ("multi_modal_projector", "multi_modal_projector")),
                             r"model\.vision_tower\.transformer\.layers\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj)",
                             r"model\.vision_tower\.transformer\.layers\.\d+\.feed_forward\."
                             r"(gate_proj|up_proj|down_proj)", sized_images=True),
    # Gemma 4 (transformers' Gemma4ForConditionalGeneration): its vision tower and embedder in front of our decoder
    # for images and video frames, and E2B's / E4B's audio tower and embedder (audio clips, data/audio.py). Two-way
    # attention inside an image only where the config asks for it (use_bidirectional_attention "vision"), and then
    # in the sliding layers only (ModelConfig.image_blocks_sliding_only)
    "gemma4": VisionFamily("gemma4", (("vision_tower", "vision_tower"), ("embed_vision", "embed_vision"),
                                      ("audio_tower", "audio_tower"), ("embed_audio", "embed_audio")),
                           r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\."
                           r"(q_proj|k_proj|v_proj|o_proj)\.linear",
                           r"model\.vision_tower\.encoder\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.linear",
                           positioned_patches=True, video="positioned",
                           # the conformer's linears sit inside Gemma4ClippableLinear (PEFT takes the inner one)
                           audio_attention_targets=r"model\.audio_tower\.layers\.\d+\.self_attn\."
                                                   r"((q_proj|k_proj|v_proj|post)\.linear|relative_k_proj)",
                           audio_mlp_targets=r"model\.audio_tower\.layers\.\d+\.(feed_forward[12]\."
                                             r"(ffw_layer_1|ffw_layer_2)|lconv1d\.(linear_start|linear_end))\.linear",
                           vision_projection_targets=r"model\.embed_vision\.embedding_projection",
                           audio_projection_targets=r"model\.embed_audio\.embedding_projection"),
    # SmolVLM (transformers' Idefics3ForConditionalGeneration: SmolVLM-256M / 500M / 2.2B-Instruct): the SigLIP-style
    # tower and the pixel-shuffle connector in front of a Llama text model, under `model.text_model`
    "idefics3": VisionFamily("idefics3", (("vision_model", "vision_model"), ("connector", "connector")),
                             r"model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
                             r"model\.vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)", tiles=True,
                             text_prefix="text_model"),
    # InternVL3 / InternVL3.5 (transformers' InternVLForConditionalGeneration, the "-hf" checkpoints): InternViT and the
    # pixel-shuffle MLP projector in front of a Qwen2 / Qwen3 text model
    "internvl": VisionFamily("internvl", (("vision_tower", "vision_tower"),
                                          ("multi_modal_projector", "multi_modal_projector")),
                             r"model\.vision_tower\.encoder\.layer\.\d+\.attention\."
                             r"(q_proj|k_proj|v_proj|projection_layer)",
                             r"model\.vision_tower\.encoder\.layer\.\d+\.mlp\.(fc1|fc2)", shuffled_patches=True),
}
# LLaVA (transformers' LlavaForConditionalGeneration with a CLIP or SigLIP tower: LLaVA-1.5 and its kin): Gemma 3's
# module names, the tower's layer vision_feature_layer (class token dropped by the "default" strategy) through the MLP
# projector, a fixed number of tokens an image, attended causally
FAMILIES["llava"] = replace(FAMILIES["gemma3"], model_type="llava", bidirectional_images=False, layer_features=True)
# LLaVA-NeXT (transformers' LlavaNextForConditionalGeneration: LLaVA-1.6 / llava-v1.6-*-hf, llama3-llava-next): LLaVA's
# tower and projector on each image's tiles, and the row-end image_newline (a parameter under `model.`)
FAMILIES["llava_next"] = replace(FAMILIES["llava"], model_type="llava_next", anyres=True,
                                 vision_modules=FAMILIES["llava"].vision_modules + (("image_newline", "image_newline"),))
# LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration: llava-onevision-qwen2-*-ov-hf): LLaVA-NeXT's
# tiles on a SigLIP tower before a Qwen2, a grid of more than anyres_max_N tiles' features interpolated down; videos as
# frames of the tower's size, each frame's features pooled (models/vision_features.py: pooled_video_features)
FAMILIES["llava_onevision"] = replace(FAMILIES["llava_next"], model_type="llava_onevision", video="pooled")
# Aya Vision (transformers' AyaVisionForConditionalGeneration: aya-vision-8b / -32b): LLaVA's layout with every patch of
# a SigLIP tower's last layer ("full") through a projector that pixel-shuffles them itself, on GotOcr2's tiles and
# thumbnail, before a Cohere 2 text model
FAMILIES["aya_vision"] = replace(FAMILIES["llava"], model_type="aya_vision")
# SmolVLM2 (transformers' SmolVLMForConditionalGeneration): Idefics3's layout and image tiles (videos not taken)
FAMILIES["smolvlm"] = replace(FAMILIES["idefics3"], model_type="smolvlm")
# Qwen3-VL-MoE: Qwen3-VL's tower and DeepStack in front of a Qwen3-MoE-style decoder (experts in models/moe.py)
FAMILIES["qwen3_vl_moe"] = replace(FAMILIES["qwen3_vl"], model_type="qwen3_vl_moe")
# Qwen3.5: Qwen3-VL's tower without DeepStack in front of the Qwen3.5 decoder (gated DeltaNet + gated attention)
FAMILIES["qwen3_5"] = replace(FAMILIES["qwen3_vl"], model_type="qwen3_5", deepstack=False)
FAMILIES["mllama"] = VisionFamily("mllama", (("vision_model", "vision_model"),
                                            ("multi_modal_projector", "multi_modal_projector")),
                                   r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\.self_attn\."
                                   r"(q_proj|k_proj|v_proj|o_proj)",
                                   r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\.mlp\."
                                   r"(fc1|fc2)",
                                   cross_attention=True)
FAMILIES["qwen3_5_moe"] = replace(FAMILIES["qwen3_5"], model_type="qwen3_5_moe")  # its decoder's MLPs: experts
# PaliGemma / PaliGemma 2: a SigLIP tower and a linear projector (Gemma 3's module names) before a Gemma / Gemma 2
# decoder, the images' tokens first in the row, then <bos>, the prompt and "\n" (the prefix), then the answer
FAMILIES["paligemma"] = replace(FAMILIES["gemma3"], model_type="paligemma", bidirectional_images=False,
                                prefix_lm=True)


def patches_per_token(family: VisionFamily, vlm_config) -> float:
    """How many of the vision tower's patch positions one image placeholder token stands for (what the tower holds
    per token the decoder sees, for train/memory_policy.py's estimate): Qwen and Mistral 3 merge spatial_merge_size^2
    patches into a token, Gemma 3 pools its (image_size / patch_size)^2 patches into mm_tokens_per_image, Idefics3
    shuffles scale_factor^2 patches into one, InternVL 1 / downsample_ratio^2, Gemma 4 pools pooling_kernel_size^2,
    Llama 3.2 Vision's one <|image|> stands for max_num_tiles tiles of (image_size / patch_size)^2 + 1 positions;
    LLaVA's families keep one a token (their tiles' and newline tokens aside). A value the config lacks counts as 4,
    the most common merge."""
    vision = getattr(vlm_config, "vision_config", None)

    def side(value):
        """A size that may be a (height, width) pair, as one side."""
        return value[0] if isinstance(value, (list, tuple)) else value
    if family.mrope:
        merge = getattr(vision, "spatial_merge_size", None)
    elif family.sized_images:
        merge = getattr(vlm_config, "spatial_merge_size", None)
    elif family.model_type == "gemma3":
        tokens = getattr(vlm_config, "mm_tokens_per_image", None)
        patches = (side(vision.image_size) // side(vision.patch_size)) ** 2 if vision is not None else None
        return patches / tokens if tokens and patches else 4.0
    elif family.tiles:
        merge = getattr(vlm_config, "scale_factor", None)
    elif family.shuffled_patches:
        ratio = getattr(vlm_config, "downsample_ratio", None)
        return 1 / ratio ** 2 if ratio else 4.0
    elif family.positioned_patches:
        merge = getattr(vision, "pooling_kernel_size", None)
    elif family.cross_attention:  # Llama 3.2 Vision: one <|image|> token for up to max_num_tiles tiles of patches
        tiles = getattr(vision, "max_num_tiles", 4)
        return float(tiles * ((side(vision.image_size) // side(vision.patch_size)) ** 2 + 1))
    else:  # LLaVA, LLaVA-NeXT, LLaVA-OneVision
        return 1.0
    return float(merge * merge) if merge else 4.0
