"""The vision half of a vision-language model's GGUF export: the "mmproj" file that llama.cpp's libmtmd (clip)
loads beside the text model's GGUF (`llama-mtmd-cli -m model.gguf --mmproj mmproj.F16.gguf`, llama-server
`--mmproj`, or a second FROM line in an Ollama Modelfile).

Layout and keys follow llama.cpp's tools/mtmd (clip-impl.h's tensor names, clip.cpp's hparams) as
convert_hf_to_gguf.py --mmproj writes them:
- Gemma 3 (projector "gemma3"): the SigLIP tower (`v.patch_embd`, `v.position_embd`, `v.blk.N.{attn_q,attn_k,
  attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}`, `v.post_ln`), the projection `mm.input_projection.weight` stored as
  transformers keeps it ((vision hidden, text hidden), not transposed) and `mm.soft_emb_norm.weight` as 1 + w
  (Gemma's RMSNorm scales by 1 + w, clip's by w). The average pool's size is `clip.vision.projector.scale_factor`
  when it is not llama.cpp's default of 4 patches a side.
- Qwen2-VL ("qwen2vl_merger"), Qwen2.5-VL ("qwen2.5vl_merger") and Qwen3-VL ("qwen3vl_merger"): the Conv3d patch
  embedding split along its two frames into `v.patch_embd.weight` and `v.patch_embd.weight.1` (a still image is
  the same frame twice, so clip sums the two 2-D convolutions), the fused qkv split into q, k and v, `merger.ln_q`
  as `v.post_ln` and the merger MLP as `mm.0` / `mm.2`. Qwen3-VL keeps its qkv fused (`attn_qkv`), adds the patch
  bias, the learned position table (`v.position_embd`, whose grid gives `clip.vision.image_size`) and its
  DeepStack mergers as `v.deepstack.<vision layer>.{norm,fc1,fc2}` flagged by `clip.vision.is_deepstack_layers`;
  its text GGUF (llama.cpp's qwen3vl) records `n_deepstack_layers`. Qwen2.5-VL's windowed layers are given by
  `clip.vision.n_wa_pattern` (every n-th layer attends fully); llama.cpp fixes the window at 112 pixels.
- Mistral 3 ("pixtral"): the Pixtral tower (`v.patch_embd`, `v.pre_ln`, `v.blk.N.{attn_q,attn_k,attn_v,attn_out,
  ln1,ln2,ffn_gate,ffn_up,ffn_down}`) with q/k rows in llama.cpp's adjacent-pair RoPE order, the projector's norm
  `mm.input_norm`, its patch merger `mm.patch_merger` and linears `mm.1` / `mm.2`, and the text model's [IMG_BREAK]
  embedding row as `v.token_embd.img_break` (libmtmd puts it between an image's rows itself).
- Gemma 4 ("gemma4v"): export/gguf_mmproj_gemma4.py.
- LLaVA with a SigLIP tower ("mlp": the two-layer projector): export/gguf_mmproj_llava.py.
- InternVL ("internvl": InternViT-300M, pixel shuffle, the LayerNorm + MLP projector): export/gguf_mmproj_internvl.py.
- Idefics3 / SmolVLM ("idefics3": SigLIP on tiles, the pixel-shuffle connector): export/gguf_mmproj_idefics3.py.
Norms, biases and the patch/position embeddings are stored in f32, the matrices in f16 (f32 when the export asks
for f32), as the converter stores them.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_mmproj_gemma4 import check_gemma4v, gemma4v_tensor, write_gemma4v_metadata
from fasttune.export.gguf_mmproj_gemma4_audio import check_gemma4a, gemma4a_tensor, keep_f32, write_gemma4a_metadata
from fasttune.export.gguf_mmproj_idefics3 import check_idefics3, idefics3_tensor, write_idefics3_metadata
from fasttune.export.gguf_mmproj_internvl import check_internvl, internvl_tensor, write_internvl_metadata
from fasttune.export.gguf_mmproj_llava import add_missing_biases, check_llava, llava_tensor, write_llava_metadata
from fasttune.export.gguf_mmproj_tower import siglip_encoder, write_tower_sizes
from fasttune.export.gguf_types import interleave_rotary_rows

PROJECTORS = {"gemma3": "gemma3", "qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger",
              "qwen3_vl": "qwen3vl_merger", "qwen3_vl_moe": "qwen3vl_merger", "qwen3_5": "qwen3vl_merger",
              "qwen3_5_moe": "qwen3vl_merger", "mistral3": "pixtral", "gemma4": "gemma4v",
              "llava": "mlp", "internvl": "internvl", "idefics3": "idefics3", "smolvlm": "idefics3"}
# one tower (learned positions; DeepStack but in Qwen3.5), a dense, an MoE or Qwen3.5's decoder
QWEN3 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
DEFAULT_POOL = 4  # llama.cpp's gemma3 pools 4 x 4 patches into one token unless scale_factor says otherwise
QWEN_WINDOW_PIXELS = 112  # clip.cpp's fixed window for qwen2.5vl_merger
QWEN_NORM_EPS = 1e-6  # transformers' Qwen2-VL / Qwen2.5-VL vision norms use this eps, not a config field
QWEN_IMAGE_SIZE = 560  # what convert_hf_to_gguf.py writes for Qwen (clip only uses it for its warm-up image)
ACTIVATIONS = {"gemma3": ("gelu_pytorch_tanh",), "qwen2_vl": ("quick_gelu",), "qwen2_5_vl": ("silu",),
               "qwen3_vl": ("gelu_pytorch_tanh",), "qwen3_vl_moe": ("gelu_pytorch_tanh",),
               "qwen3_5": ("gelu_pytorch_tanh",), "qwen3_5_moe": ("gelu_pytorch_tanh",), "mistral3": ("silu", "gelu"),
               "gemma4": ("gelu_pytorch_tanh",)}
PIXTRAL_EPS = 1e-5  # transformers' Pixtral norms (a constant there, not a config field)
PIXTRAL_ROPE_THETA = 10000.0  # the 2-D RoPE base clip's pixtral uses

# transformers' names (without the leading "model."; the SigLIP tower may sit under "vision_model.") -> clip's
_GEMMA3 = siglip_encoder(r"vision_tower\.(?:vision_model\.)?") + [
           (r"vision_tower\.(?:vision_model\.)?post_layernorm\.(weight|bias)", r"v.post_ln.\1"),
           (r"multi_modal_projector\.mm_input_projection_weight", "mm.input_projection.weight"),
           (r"multi_modal_projector\.mm_soft_emb_norm\.weight", "mm.soft_emb_norm.weight")]
_QWEN = [(r"visual\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"v.blk.\1.ln\2.\3"),
         (r"visual\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
         (r"visual\.blocks\.(\d+)\.mlp\.(?:fc1|up_proj)\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
         (r"visual\.blocks\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"v.blk.\1.ffn_gate.\2"),
         (r"visual\.blocks\.(\d+)\.mlp\.(?:fc2|down_proj)\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
         (r"visual\.merger\.ln_q\.(weight|bias)", r"v.post_ln.\1"),
         (r"visual\.merger\.mlp\.([02])\.(weight|bias)", r"mm.\1.\2")]
_QWEN3 = [(r"visual\.patch_embed\.proj\.bias", "v.patch_embd.bias"),
          (r"visual\.pos_embed\.weight", "v.position_embd.weight"),
          (r"visual\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"v.blk.\1.ln\2.\3"),
          (r"visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"v.blk.\1.attn_qkv.\2"),  # clip reads it fused
          (r"visual\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
          (r"visual\.blocks\.(\d+)\.mlp\.linear_fc1\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
          (r"visual\.blocks\.(\d+)\.mlp\.linear_fc2\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
          (r"visual\.merger\.norm\.(weight|bias)", r"v.post_ln.\1"),
          (r"visual\.merger\.linear_fc1\.(weight|bias)", r"mm.0.\1"),
          (r"visual\.merger\.linear_fc2\.(weight|bias)", r"mm.2.\1")]
_PIXTRAL = [(r"vision_tower\.patch_conv\.weight", "v.patch_embd.weight"),
            (r"vision_tower\.ln_pre\.weight", "v.pre_ln.weight"),
            (r"vision_tower\.transformer\.layers\.(\d+)\.attention\.([qkv])_proj\.weight", r"v.blk.\1.attn_\2.weight"),
            (r"vision_tower\.transformer\.layers\.(\d+)\.attention\.o_proj\.weight", r"v.blk.\1.attn_out.weight"),
            (r"vision_tower\.transformer\.layers\.(\d+)\.attention_norm\.weight", r"v.blk.\1.ln1.weight"),
            (r"vision_tower\.transformer\.layers\.(\d+)\.ffn_norm\.weight", r"v.blk.\1.ln2.weight"),
            (r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight",
             r"v.blk.\1.ffn_\2.weight"),
            (r"multi_modal_projector\.norm\.weight", "mm.input_norm.weight"),
            (r"multi_modal_projector\.patch_merger\.merging_layer\.weight", "mm.patch_merger.weight"),
            (r"multi_modal_projector\.linear_([12])\.(weight|bias)", r"mm.\1.\2")]
_DEEPSTACK = re.compile(r"visual\.deepstack_merger_list\.(\d+)\.(norm|linear_fc1|linear_fc2)\.(weight|bias)")
_SKIPPED = re.compile(r"vision_tower\.(?:vision_model\.)?head\.")  # SigLIP's pooling head: Gemma 3 never runs it


def is_vision_model(model) -> bool:
    """Whether `model` is a vision-language model (models/vision.py's VisionCausalLM with its tower attached)."""
    return getattr(model, "family", None) is not None


def check_vision_supported(model, processor=None) -> None:
    """ConfigError, before anything is written, when llama.cpp's clip has no projector for this vision-language
    model or would compute another tower (activation, patch frames, window size or layer pattern it fixes; Gemma
    4's audio tower and `processor`'s audio feature extractor too)."""
    family = model.family.model_type
    vision = model.hf_config.vision_config
    if family not in PROJECTORS:
        raise ConfigError(f"GGUF export of {family} vision-language models is not supported yet; it covers "
                          f"{', '.join(sorted(PROJECTORS))}. Save the merged model (save_pretrained_merged) and "
                          f"convert it with llama.cpp's convert_hf_to_gguf.py, once as it is and once with --mmproj.")
    if family == "llava":
        check_llava(model)
        return
    if family == "internvl":
        check_internvl(model)
        return
    if family in ("idefics3", "smolvlm"):
        check_idefics3(model, processor)
        return
    act = getattr(vision, "hidden_act", None) or getattr(vision, "hidden_activation", None)
    if act not in ACTIVATIONS[family]:
        raise ConfigError(f"This {family} vision tower uses hidden_act={act!r}; llama.cpp's clip computes "
                          f"{ACTIVATIONS[family][0]} for it, so it cannot be exported to GGUF.")
    if family == "gemma3":
        _pool_size(model)
        return
    if family == "mistral3":
        _check_pixtral(model)
        return
    if family == "gemma4":
        check_gemma4v(model)
        if getattr(model, "hears", False):
            check_gemma4a(model, getattr(processor, "audio_extractor", None))
        return
    if family in QWEN3:
        _warn_imrope_split(model.arch)
        side = round(vision.num_position_embeddings ** 0.5)
        if side * side != vision.num_position_embeddings:
            raise ConfigError(f"This Qwen3-VL vision tower has {vision.num_position_embeddings} position embeddings, "
                              f"not a square grid, which llama.cpp's clip cannot resize; it cannot be exported to "
                              f"GGUF.")
    if vision.temporal_patch_size != 2:
        raise ConfigError(f"This {family} vision tower has temporal_patch_size={vision.temporal_patch_size}; "
                          f"llama.cpp's clip reads two frames per patch, so it cannot be exported to GGUF.")
    if family == "qwen2_5_vl":
        window = vision.window_size
        if window != QWEN_WINDOW_PIXELS:
            raise ConfigError(f"This Qwen2.5-VL vision tower attends in windows of {window} pixels (window_size); "
                              f"llama.cpp fixes the window at {QWEN_WINDOW_PIXELS}, so the GGUF would compute "
                              f"another model. Save the merged model with save_pretrained_merged instead.")
        _window_pattern(vision)


def imrope_fourth_axis_pairs(sections, pairs: int) -> list[int]:
    """The rotary pairs (of `pairs`) that transformers' interleaved M-RoPE (Qwen3-VL's apply_interleaved_mrope)
    rotates by the temporal position but llama.cpp's rule (ggml's rope_multi with GGML_ROPE_TYPE_IMROPE: pair k goes
    to axis k % 3 only while k < 3 * that axis' section) sends to its fourth position axis instead."""
    t, h, w = sections
    return [k for k in range(pairs)
            if not ((k % 3 == 1 and k < 3 * h) or (k % 3 == 2 and k < 3 * w) or (k % 3 == 0 and k < 3 * t))]


def _warn_imrope_split(cfg):
    """A warning when llama.cpp splits this Qwen3-VL's rotary pairs over the position axes otherwise than transformers
    (imrope_fourth_axis_pairs), with the largest angle between the two at max_position_embeddings."""
    pairs = imrope_fourth_axis_pairs(cfg.mrope_section, cfg.rotary_dim // 2)
    if pairs:
        fastest = cfg.rope_theta ** (-2 * pairs[0] / cfg.rotary_dim)
        warnings.warn(f"llama.cpp's interleaved M-RoPE rotates pairs {pairs} of this model's {cfg.rotary_dim // 2} "
                      f"rotary pairs (mrope_section {list(cfg.mrope_section)}) by a fourth position axis where "
                      f"transformers uses the temporal one; at position {cfg.max_position_embeddings} their angles "
                      f"differ by up to {cfg.max_position_embeddings * fastest:.3g} rad (the GGUF computes a slightly "
                      f"different model there; nearer positions differ less).")


def _check_pixtral(model):
    """ConfigError for a Mistral 3 tower clip's pixtral computes otherwise: features from another layer than the last
    (vision_feature_layer) or another RoPE base."""
    cfg, vision = model.hf_config, model.hf_config.vision_config
    if cfg.vision_feature_layer != -1:
        raise ConfigError(f"This Mistral 3 model takes its image features from vision layer {cfg.vision_feature_layer} "
                          f"(vision_feature_layer); llama.cpp's pixtral takes the last layer's, so it cannot be "
                          f"exported to GGUF. Save the merged model with save_pretrained_merged instead.")
    theta = float(getattr(vision, "rope_theta", None) or (getattr(vision, "rope_parameters", None) or {}).get(
        "rope_theta", PIXTRAL_ROPE_THETA))
    if theta != PIXTRAL_ROPE_THETA:
        raise ConfigError(f"This Pixtral tower rotates with RoPE base {theta:g}; llama.cpp's pixtral uses "
                          f"{PIXTRAL_ROPE_THETA:g}, so it cannot be exported to GGUF.")


def _pool_size(model) -> int:
    """Gemma 3's average-pool size: patches a side over tokens a side (transformers' Gemma3MultiModalProjector)."""
    cfg = model.hf_config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    tokens = round(cfg.mm_tokens_per_image ** 0.5)
    if tokens * tokens != cfg.mm_tokens_per_image or side % tokens:
        raise ConfigError(f"This Gemma 3 model has {cfg.mm_tokens_per_image} tokens per image over {side} x {side} "
                          f"patches, which llama.cpp's gemma3 projector cannot pool; it cannot be exported to GGUF.")
    return side // tokens


def _window_pattern(vision) -> int:
    """Qwen2.5-VL's n_wa_pattern: layer i attends fully when (i + 1) % n == 0, the only layout clip computes."""
    full, depth = list(vision.fullatt_block_indexes), vision.depth
    n = full[0] + 1 if full else 0
    if not full or full != [i for i in range(depth) if (i + 1) % n == 0]:
        raise ConfigError(f"This Qwen2.5-VL vision tower attends fully in layers {full} (fullatt_block_indexes); "
                          f"llama.cpp only computes full attention in every n-th layer (n - 1, 2n - 1, ...), so it "
                          f"cannot be exported to GGUF. Save the merged model with save_pretrained_merged instead.")
    return n


def split_vision(model, tensors: dict) -> dict:
    """Take the vision tower's and projector's tensors out of `tensors` (merged_state_dict's transformers names;
    the language model's `model.language_model.*` become `model.*`, as a text model's are) and return them under
    clip's GGUF names, fp32, in clip's layout (see the module docstring)."""
    family = model.family.model_type
    table = {"gemma3": _GEMMA3, "mistral3": _PIXTRAL}.get(family, _QWEN3 if family in QWEN3 else _QWEN)
    out = {}
    for name in list(tensors):
        if name.startswith(("model.language_model.", "model.text_model.")):  # (Idefics3 / SmolVLM: text_model)
            tensors["model." + name.split(".", 2)[2]] = tensors.pop(name)
            continue
        if name == "lm_head.weight":
            continue
        t = tensors.pop(name).float()
        short = name.removeprefix("model.")
        if _SKIPPED.match(short):
            continue
        if family == "llava":
            out.update(llava_tensor(model, short, t))
            continue
        if family == "internvl":
            out.update(internvl_tensor(short, t))
            continue
        if family in ("idefics3", "smolvlm"):
            out.update(idefics3_tensor(short, t))
            continue
        if family == "gemma4":
            if short.startswith(("audio_tower.", "embed_audio.")):
                pair = gemma4a_tensor(short, t, int(model.hf_config.audio_config.num_hidden_layers))
            else:
                pair = gemma4v_tensor(short, t, int(model.hf_config.vision_config.num_hidden_layers))
            out[pair[0]] = pair[1]
            continue
        if short == "visual.patch_embed.proj.weight":  # (D, C, 2, P, P): one 2-D kernel per frame
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = (t[:, :, i].contiguous() for i in (0, 1))
            continue
        deep = _DEEPSTACK.fullmatch(short)
        if deep:  # Qwen3-VL: under the vision layer whose output each DeepStack merger takes
            layer = model.hf_config.vision_config.deepstack_visual_indexes[int(deep[1])]
            part = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}[deep[2]]
            out[f"v.deepstack.{layer}.{part}.{deep[3]}"] = t
            continue
        fused = re.fullmatch(r"visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", short)
        if fused and family not in QWEN3:  # rows q, k, v, as transformers' VisionAttention splits them
            for part, value in zip("qkv", t.chunk(3, dim=0)):
                out[f"v.blk.{fused[1]}.attn_{part}.{fused[2]}"] = value.contiguous()
            continue
        new = next((re.sub(pattern, repl, short) for pattern, repl in table if re.fullmatch(pattern, short)), None)
        if new is None:
            raise ConfigError(f"Tensor '{name}' has no place in llama.cpp's {PROJECTORS[family]} projector; this "
                              f"vision tower cannot be exported to GGUF as it is.")
        if new == "mm.soft_emb_norm.weight":
            t = t + 1.0
        if family == "mistral3" and new.endswith(("attn_q.weight", "attn_k.weight")):  # clip's 2-D RoPE: pairs
            t = interleave_rotary_rows(t, model.hf_config.vision_config.num_attention_heads)
        out[new] = t
    if family == "llava":
        add_missing_biases(out)
    return out


def text_rows(model, processor, text_tensors: dict) -> dict:
    """What the mmproj takes from the text model's GGUF tensors (`text_tensors`, GGUF names): Mistral 3's [IMG_BREAK]
    embedding row as `v.token_embd.img_break` (libmtmd puts it between an image's rows itself; the id from
    `processor`'s row tokens); nothing for the other families."""
    if model.family.model_type != "mistral3":
        return {}
    tokenizer = getattr(processor, "tokenizer", processor)
    break_id = tokenizer.convert_tokens_to_ids(processor.image_rows[0])
    return {"v.token_embd.img_break": text_tensors["token_embd.weight"][break_id].float().clone()}


def mmproj_type(quants: list[str]) -> str:
    """The mmproj's float type for an export's methods: "f32" when f32 is among them, else "f16" (clip's usual
    type; the tower is small beside the text model, and llama.cpp quantizes it only on request)."""
    return "f32" if "f32" in quants else "f16"


def mmproj_target(text_target: Path, float_type: str) -> Path:
    """The mmproj file's path beside the text GGUF(s): `mmproj.<TYPE>.gguf` in an export folder's files
    (`model.<QUANT>.gguf`), else `mmproj-<stem>.<TYPE>.gguf` (llama.cpp's and Ollama's tools look for `mmproj*`)."""
    stem = text_target.name.split(".")[0]
    name = f"mmproj.{float_type.upper()}.gguf" if stem == "model" else f"mmproj-{stem}.{float_type.upper()}.gguf"
    return text_target.with_name(name)


def image_processor_of(processor):
    """The image processor of a vision-language model's `processor` (its image_mean / image_std go into the
    mmproj). Raises ConfigError when it has none (a bare tokenizer was passed)."""
    images = getattr(processor, "image_processor", None)
    if images is None or getattr(images, "image_mean", None) is None:
        raise ConfigError("GGUF export of a vision-language model needs its image processor (for the image mean and "
                          "std clip normalises with): pass the processor FastVisionModel.from_pretrained returned, "
                          "as in model.save_pretrained_gguf(path, processor).")
    return images


def write_mmproj(path: Path, model, processor, tensors: dict, float_type: str, name: str):
    """Write the mmproj GGUF of `tensors` (split_vision's output) to `path`: clip's metadata for the family (sizes,
    heads, norm eps, activation, image mean/std from `processor`'s image processor, projector settings) and the
    tensors in f32 (1-D, patch and position embeddings) or `float_type` ("f16" or "f32"). Raises ConfigError
    when the processor has no image processor."""
    import gguf

    family = model.family.model_type
    vision = model.hf_config.vision_config
    images = image_processor_of(processor)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(name)
    writer.add_type("mmproj")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16))
    writer.add_clip_has_vision_encoder(True)
    hears = getattr(model, "hears", False)
    if hears:  # two towers: a projector per modality and no common one (clip reads that first for both)
        writer.add_clip_vision_projector_type(PROJECTORS[family])
        write_gemma4a_metadata(writer, model)
    else:
        writer.add_clip_projector_type(PROJECTORS[family])
    writer.add_vision_projection_dim(model.config.hidden_size)
    patch = vision.patch_size  # (InternVL's: [14, 14])
    writer.add_vision_patch_size(int(patch[0] if isinstance(patch, (list, tuple)) else patch))
    writer.add_vision_head_count(int(getattr(vision, "num_heads", None) or vision.num_attention_heads))
    writer.add_vision_image_mean([float(v) for v in images.image_mean])
    writer.add_vision_image_std([float(v) for v in images.image_std])
    if family == "gemma4":
        write_gemma4v_metadata(writer, model, images)
    elif family == "llava":
        write_llava_metadata(writer, model)
    elif family == "internvl":
        write_internvl_metadata(writer, model, images)
    elif family in ("idefics3", "smolvlm"):
        write_idefics3_metadata(writer, model, images)
    elif family == "gemma3":
        write_tower_sizes(writer, vision, vision.image_size, vision.num_hidden_layers)
        writer.add_vision_use_gelu(True)
        pool = _pool_size(model)
        if pool != DEFAULT_POOL:
            writer.add_vision_projector_scale_factor(pool)
    elif family == "mistral3":
        writer.add_vision_image_size(int(vision.image_size))
        writer.add_vision_embedding_length(int(vision.hidden_size))
        writer.add_vision_feed_forward_length(int(vision.intermediate_size))
        writer.add_vision_block_count(int(vision.num_hidden_layers))
        writer.add_vision_attention_layernorm_eps(PIXTRAL_EPS)
        (writer.add_vision_use_silu if vision.hidden_act == "silu" else writer.add_vision_use_gelu)(True)
        writer.add_vision_spatial_merge_size(int(model.hf_config.spatial_merge_size))
    elif family in QWEN3:  # the learned position table's grid sets the size clip resizes it from
        writer.add_vision_image_size(round(vision.num_position_embeddings ** 0.5) * int(vision.patch_size))
        writer.add_vision_embedding_length(int(vision.hidden_size))
        writer.add_vision_feed_forward_length(int(vision.intermediate_size))
        writer.add_vision_block_count(int(vision.depth))
        writer.add_vision_attention_layernorm_eps(QWEN_NORM_EPS)
        writer.add_vision_use_gelu(True)
        writer.add_vision_spatial_merge_size(int(vision.spatial_merge_size))
        deep = set(getattr(vision, "deepstack_visual_indexes", None) or [])  # Qwen3.5's tower has none
        writer.add_vision_is_deepstack_layers([i in deep for i in range(int(vision.depth))])
    else:
        writer.add_vision_image_size(QWEN_IMAGE_SIZE)
        writer.add_vision_embedding_length(int(tensors["v.blk.0.attn_q.weight"].shape[1]))
        writer.add_vision_feed_forward_length(int(tensors["v.blk.0.ffn_up.weight"].shape[0]))
        writer.add_vision_block_count(int(vision.depth))
        writer.add_vision_attention_layernorm_eps(QWEN_NORM_EPS)
        writer.add_vision_spatial_merge_size(int(vision.spatial_merge_size))
        if family == "qwen2_5_vl":
            writer.add_vision_use_silu(True)
            writer.add_vision_n_wa_pattern(_window_pattern(vision))
    for gname, t in tensors.items():
        if t.dim() == 1 or "patch_embd" in gname or "position_embd" in gname or float_type == "f32" or \
                (hears and keep_f32(gname)):
            writer.add_tensor(gname, t.float().numpy())
        else:
            writer.add_tensor(gname, t.to(torch.float16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
