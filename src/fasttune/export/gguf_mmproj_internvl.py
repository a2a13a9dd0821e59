"""The mmproj of an InternVL model (transformers' InternVLForConditionalGeneration: InternViT-300M, pixel shuffle, the
LayerNorm + two-layer MLP projector; InternVL 2.5 / 3 / 3.5's small sizes) for llama.cpp's clip, projector type
"internvl" (clip_graph_internvl), with the keys convert_hf_to_gguf.py --mmproj writes for it.

Tensors: `v.class_embd`, `v.patch_embd.{weight,bias}`, `v.position_embd.weight`, `v.blk.N.{attn_q,attn_k,attn_v,
attn_out,ln1,ln2,ffn_up,ffn_down,ls1,ls2}` (the layer scales lambda_1 / lambda_2), `v.post_ln` when the tower ends
in a norm (use_mean_pooling=False), and the projector `mm.model.mlp.{0,1,3}` (layer_norm, linear_1, linear_2).
Keys: `clip.vision.projector.scale_factor` = 1 / downsample_ratio, `clip.vision.preproc_min_tiles` /
`preproc_max_tiles` from the image processor's min_patches / max_patches (libmtmd tiles the image as InternVL's
processor crops it), `clip.use_gelu` / `clip.use_silu`.

clip puts the class token after the patches and adds the position table row by row, so the token in row r gets
table row r; transformers puts it first (row 0 of the table, patch r at row r + 1). The table is written rotated
(patch rows first, the class token's row last) so that every token gets its own row (tested against llama-cpp-python
0.3.36's libmtmd; a file from convert_hf_to_gguf.py keeps transformers' order and shifts every patch by one row).

Refused: the 6B ViT's RMS norms and q/k norms (clip switches to RMS norm by the tower's size, not by a key),
features from another layer than the last (clip takes the last), a select strategy that keeps the class token.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_mmproj_tower import renamed, write_tower_sizes

_T = r"vision_tower\."
INTERNVL = [(_T + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"v.patch_embd.\1"),
            (_T + r"encoder\.layer\.(\d+)\.lambda_([12])", r"v.blk.\1.ls\2.weight"),
            (_T + r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"v.blk.\1.attn_\2.\3"),
            (_T + r"encoder\.layer\.(\d+)\.attention\.projection_layer\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
            (_T + r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"v.blk.\1.ln1.\2"),
            (_T + r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"v.blk.\1.ln2.\2"),
            (_T + r"encoder\.layer\.(\d+)\.mlp\.fc1\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
            (_T + r"encoder\.layer\.(\d+)\.mlp\.fc2\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
            (_T + r"layernorm\.(weight|bias)", r"v.post_ln.\1"),
            (r"multi_modal_projector\.layer_norm\.(weight|bias)", r"mm.model.mlp.0.\1"),
            (r"multi_modal_projector\.linear_1\.(weight|bias)", r"mm.model.mlp.1.\1"),
            (r"multi_modal_projector\.linear_2\.(weight|bias)", r"mm.model.mlp.3.\1")]


def check_internvl(model) -> None:
    """ConfigError for an InternVL model clip's internvl graph computes otherwise (see the module docstring)."""
    cfg, vision = model.hf_config, model.hf_config.vision_config
    if vision.norm_type != "layer_norm" or vision.use_qk_norm:
        raise ConfigError("This InternVL vision tower uses RMS norms or q/k norms (InternViT-6B); llama.cpp's clip "
                          "picks those by the tower's size, so the export covers InternViT-300M towers only. Save "
                          "the merged model with save_pretrained_merged instead.")
    if cfg.vision_feature_layer != -1 or cfg.vision_feature_select_strategy != "default":
        raise ConfigError(f"This InternVL model takes its image features from vision layer "
                          f"{cfg.vision_feature_layer} with strategy {cfg.vision_feature_select_strategy!r}; "
                          f"llama.cpp's clip takes the last layer without the class token, so it cannot be exported "
                          f"to GGUF.")
    ratio = float(cfg.downsample_ratio)
    if ratio <= 0 or abs(1 / ratio - round(1 / ratio)) > 1e-6:
        raise ConfigError(f"This InternVL model pixel-shuffles by downsample_ratio={ratio}; llama.cpp's clip merges "
                          f"a whole number of patches a side (1 / downsample_ratio), so it cannot be exported to GGUF.")
    if vision.hidden_act not in ("gelu", "silu"):
        raise ConfigError(f"This InternVL vision tower uses hidden_act={vision.hidden_act!r}; llama.cpp's clip "
                          f"computes gelu or silu, so it cannot be exported to GGUF.")


def internvl_tensor(short: str, t: torch.Tensor) -> dict:
    """{clip name: tensor} for one transformers tensor `short` (without the leading "model.") of an InternVL
    model's tower or projector. Raises ConfigError for a name with no place."""
    if short == "vision_tower.embeddings.cls_token":
        return {"v.class_embd": t.reshape(-1)}
    if short == "vision_tower.embeddings.position_embeddings":  # (1, 1 + patches, D): the class token's row last
        table = t.reshape(-1, t.shape[-1])
        return {"v.position_embd.weight": torch.cat([table[1:], table[:1]])}
    return renamed(INTERNVL, short, t, "internvl")


def write_internvl_metadata(writer, model, images) -> None:
    """clip's hyperparameters of an InternVL tower (see the module docstring); `images`: the image processor (its
    min_patches / max_patches). The projector type, head count, patch size and image mean / std are written by
    export/gguf_mmproj.py's write_mmproj."""
    vision = model.hf_config.vision_config
    size = vision.image_size  # ([56, 56])
    write_tower_sizes(writer, vision, size[0] if isinstance(size, (list, tuple)) else size, vision.num_hidden_layers)
    (writer.add_vision_use_silu if vision.hidden_act == "silu" else writer.add_vision_use_gelu)(True)
    writer.add_vision_projector_scale_factor(round(1 / float(model.hf_config.downsample_ratio)))
    low, high = getattr(images, "min_patches", None), getattr(images, "max_patches", None)
    if low:
        writer.add_vision_preproc_min_tiles(int(low))
    if high:
        writer.add_vision_preproc_max_tiles(int(high))
