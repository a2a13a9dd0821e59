"""What the mmproj writers of several vision towers share (export/gguf_mmproj*.py): renaming a transformers tensor by
a table of patterns, the table of a SigLIP / CLIP-style encoder, and clip's size keys of a ViT-style tower."""
from __future__ import annotations

import re

import torch

from fasttune.errors import ConfigError


def renamed(table: list, short: str, t: torch.Tensor, projector: str) -> dict:
    """{clip name: t} for the transformers tensor `short` (without the leading "model.") by the first (pattern,
    replacement) of `table` that matches it whole. Raises ConfigError naming llama.cpp's `projector` when none does."""
    for pattern, repl in table:
        if re.fullmatch(pattern, short):
            return {re.sub(pattern, repl, short): t}
    raise ConfigError(f"Tensor 'model.{short}' has no place in llama.cpp's {projector} projector; this vision tower "
                      f"cannot be exported to GGUF as it is.")


def siglip_encoder(prefix: str) -> list:
    """(pattern, clip name) rows for a SigLIP / CLIP-style encoder whose transformers names start with the regex
    `prefix`: the patch and position embeddings, and each layer's q/k/v, out_proj, layer_norm1/2 and fc1/fc2 (Gemma 3's,
    LLaVA's and Idefics3's towers name them alike; their post-norm and projectors differ)."""
    layer = prefix + r"encoder\.layers\.(\d+)\."
    return [(prefix + r"embeddings\.patch_embedding\.(weight|bias)", r"v.patch_embd.\1"),
            (prefix + r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
            (layer + r"self_attn\.([qkv])_proj\.(weight|bias)", r"v.blk.\1.attn_\2.\3"),
            (layer + r"self_attn\.out_proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
            (layer + r"layer_norm([12])\.(weight|bias)", r"v.blk.\1.ln\2.\3"),
            (layer + r"mlp\.fc1\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
            (layer + r"mlp\.fc2\.(weight|bias)", r"v.blk.\1.ffn_down.\2")]


def write_tower_sizes(writer, vision, image_size: int, blocks: int) -> None:
    """clip's image size (pixels), embedding and feed-forward widths, block count and norm epsilon of a tower whose
    transformers config `vision` has hidden_size, intermediate_size and layer_norm_eps."""
    writer.add_vision_image_size(int(image_size))
    writer.add_vision_embedding_length(int(vision.hidden_size))
    writer.add_vision_feed_forward_length(int(vision.intermediate_size))
    writer.add_vision_block_count(int(blocks))
    writer.add_vision_attention_layernorm_eps(float(vision.layer_norm_eps))
