"""Gemma 4's vision tower and embedder in the mmproj file, as llama.cpp's clip reads it (projector "gemma4v"), the
way convert_hf_to_gguf.py --mmproj (Gemma4VisionAudioModel) writes it: the encoder layers under gguf's tensor map
(`v.blk.N.{attn_q,attn_k,attn_v,attn_out,attn_q_norm,attn_k_norm,ln1,ln2,ffn_gate,ffn_up,ffn_down,...}`), the
patch embedding's (hidden, P * P * 3) matrix as a (hidden, 3, P, P) convolution kernel, the (2, positions, hidden)
position table and the embedder's projection as they are, clipped linears' bounds as 1-element tensors.

clip's gemma4v fixes the 2-D RoPE base at 100 and pools pooling_kernel_size patches a side (3 unless
`clip.vision.projector.scale_factor` says otherwise); it resizes each image to within image_min_pixels /
image_max_pixels, written here as transformers' budget (max_soft_tokens x (patch x pool)^2 pixels, which
Gemma4ImageProcessor scales every image to), where llama.cpp's own default is 40 to 280 tokens. E2B's / E4B's
audio tower goes into the same file (gguf_mmproj_gemma4_audio.py, "gemma4a").
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError

PROJECTOR = "gemma4v"
ROPE_THETA = 100.0  # clip.cpp's gemma4v RoPE base
DEFAULT_POOL = 3  # clip.cpp's gemma4v pooling kernel unless scale_factor is written
_SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")


def check_gemma4v(model) -> None:
    """ConfigError, before anything is written, for a Gemma 4 vision tower clip computes otherwise (another RoPE
    base)."""
    vision = model.hf_config.vision_config
    theta = float((getattr(vision, "rope_parameters", None) or {}).get("rope_theta", ROPE_THETA))
    if theta != ROPE_THETA:
        raise ConfigError(f"This Gemma 4 vision tower rotates with RoPE base {theta:g}; llama.cpp's gemma4v uses "
                          f"{ROPE_THETA:g}, so it cannot be exported to GGUF. Save the merged model with "
                          f"save_pretrained_merged instead.")


def gemma4v_tensor(short: str, t: torch.Tensor, n_blocks: int) -> tuple[str, torch.Tensor]:
    """clip's (name, tensor) for one of Gemma 4's vision tensors (`short`: transformers' name without "model.",
    fp32; the audio tower's: gguf_mmproj_gemma4_audio.py)."""
    name = "model." + short
    name = name.replace("model.vision_tower.encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
    if name.endswith(("layer_scalar", "position_embedding_table")):
        name += ".weight"
    if name.endswith("patch_embedder.input_proj.weight"):  # (hidden, P * P * 3), channels last -> (hidden, 3, P, P)
        side = round((t.shape[1] // 3) ** 0.5)
        t = t.reshape(t.shape[0], side, side, 3).permute(0, 3, 1, 2).contiguous()
    return clip_tensor(name, t, n_blocks, short, PROJECTOR)


def clip_tensor(name: str, t: torch.Tensor, n_blocks: int, short: str, projector: str) -> tuple[str, torch.Tensor]:
    """(gguf's MMPROJ name for the converter-style `name`, `t` with a scalar as a 1-element tensor). Raises
    ConfigError naming `short` (transformers' name) when `projector` has no place for it."""
    import gguf

    if t.dim() == 0:
        t = t.reshape(1)
    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks).get_name(name, try_suffixes=_SUFFIXES)
    if mapped is None:
        raise ConfigError(f"Tensor '{short}' has no place in llama.cpp's {projector} projector; this tower cannot be "
                          f"exported to GGUF as it is.")
    return mapped, t.contiguous()


def write_gemma4v_metadata(writer, model, images) -> None:
    """clip's keys for Gemma 4's tower: sizes, heads, norm eps, GELU, the pooling when it is not 3 patches a side,
    and the image budget of `images` (the image processor: max_soft_tokens, patch_size, pooling_kernel_size) as the
    resize bounds."""
    vision = model.hf_config.vision_config
    pool = int(getattr(images, "pooling_kernel_size", None) or getattr(vision, "pooling_kernel_size", DEFAULT_POOL))
    patch = int(vision.patch_size)
    writer.add_vision_image_size(224)  # (unused by gemma4v; what the converter writes)
    writer.add_vision_embedding_length(int(vision.hidden_size))
    writer.add_vision_feed_forward_length(int(vision.intermediate_size))
    writer.add_vision_block_count(int(vision.num_hidden_layers))
    writer.add_vision_attention_layernorm_eps(float(getattr(vision, "rms_norm_eps", 1e-6)))
    writer.add_vision_use_gelu(True)
    if pool != DEFAULT_POOL:
        writer.add_vision_projector_scale_factor(pool)
    budget = int(getattr(images, "max_soft_tokens", 280)) * (patch * pool) ** 2
    writer.add_vision_min_pixels(budget)
    writer.add_vision_max_pixels(budget)
