"""The mmproj of an Idefics3 / SmolVLM model (transformers' Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration: a SigLIP tower on fixed-size tiles, the pixel-shuffle connector and its linear
projection) for llama.cpp's clip, projector type "idefics3", with the keys convert_hf_to_gguf.py --mmproj writes.

Tensors: `v.patch_embd.{weight,bias}`, `v.position_embd.weight`, `v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,
ffn_up,ffn_down}`, `v.post_ln` (transformers' post_layernorm, which Idefics3's features pass through) and the
connector's projection `mm.model.fc.weight`. Keys: `clip.vision.projector.scale_factor` (the pixel shuffle's),
`clip.vision.preproc_image_size` (the processor's longest edge, to which libmtmd resizes an image before cutting
it into tiles of `clip.vision.image_size` pixels, as transformers' processor does), `clip.use_gelu`.

libmtmd lays an image out as transformers' Idefics3Processor does (the tiles row by row, each after
`<fake_token_around_image><row_R_col_C>`, a newline after each row, then "\n\n", `<fake_token_around_image>`,
`<global-img>` and the whole image resized to one tile); it looks "\n\n" up as one token of the vocabulary, which
SmolVLM's tokenizer has.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_mmproj_tower import renamed, siglip_encoder, write_tower_sizes

_T = r"vision_model\."
IDEFICS3 = siglip_encoder(_T) + [
            (_T + r"post_layernorm\.(weight|bias)", r"v.post_ln.\1"),
            (r"connector\.modality_projection\.proj\.weight", "mm.model.fc.weight")]


def check_idefics3(model, processor) -> None:
    """ConfigError for an Idefics3 / SmolVLM model clip computes otherwise: another tower activation, an image
    processor that does not split images or has no longest edge, a tokenizer without "\\n\\n" as one token (libmtmd looks it up to start the
    whole image; `processor`: the model's processor, or None)."""
    images, tokenizer = getattr(processor, "image_processor", None), getattr(processor, "tokenizer", None)
    if tokenizer is not None and len(tokenizer("\n\n", add_special_tokens=False)["input_ids"]) != 1:
        raise ConfigError("This tokenizer writes \"\\n\\n\" as several tokens; llama.cpp's libmtmd looks it up as "
                          "one token before a SmolVLM / Idefics3 image's whole-image tile (SmolVLM's and Idefics3's "
                          "own tokenizers have it), so the GGUF could not lay images out. Export with the model's own "
                          "tokenizer.")
    act = model.hf_config.vision_config.hidden_act
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"This {model.family.model_type} vision tower uses hidden_act={act!r}; llama.cpp's clip "
                          f"computes gelu_pytorch_tanh for it, so it cannot be exported to GGUF.")
    if images is not None and getattr(images, "do_image_splitting", True) is False:
        raise ConfigError("This Idefics3 / SmolVLM image processor does not split images (do_image_splitting=False); "
                          "llama.cpp's libmtmd always cuts them into tiles plus the whole image, so the GGUF would "
                          "see other image tokens than the model was trained on. Export with splitting on, or save "
                          "the merged model with save_pretrained_merged.")
    if images is not None and not longest_edge(images):
        raise ConfigError("This Idefics3 / SmolVLM image processor has no size['longest_edge'], which llama.cpp's "
                          "clip needs to tile images as the processor does; pass the model's own processor.")


def longest_edge(images) -> int | None:
    """The image processor's size["longest_edge"] (a dict or transformers' SizeDict), or None."""
    size = getattr(images, "size", None)
    value = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(value) if value else None


def idefics3_tensor(short: str, t: torch.Tensor) -> dict:
    """{clip name: tensor} for one transformers tensor `short` (without the leading "model.") of an Idefics3 /
    SmolVLM model's tower or connector. Raises ConfigError for a name with no place."""
    return renamed(IDEFICS3, short, t, "idefics3")


def write_idefics3_metadata(writer, model, images) -> None:
    """clip's hyperparameters of an Idefics3 / SmolVLM tower (see the module docstring); `images`: the image
    processor (its longest edge). The projector type, head count, patch size and image mean / std are written by
    export/gguf_mmproj.py's write_mmproj."""
    vision = model.hf_config.vision_config
    write_tower_sizes(writer, vision, vision.image_size, vision.num_hidden_layers)
    writer.add_vision_use_gelu(True)
    writer.add_vision_projector_scale_factor(int(model.hf_config.scale_factor))
    writer.add_vision_preproc_image_size(longest_edge(images))
