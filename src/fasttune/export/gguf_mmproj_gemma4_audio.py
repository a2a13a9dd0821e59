"""Gemma 4's audio tower (E2B / E4B) and audio embedder in the mmproj file, as llama.cpp's clip reads it (projector
"gemma4a"), the way convert_hf_to_gguf.py --mmproj (Gemma4VisionAudioModel) writes it beside the vision tower:
`model.audio_tower.*` renamed `conformer.*` and `*.linear.*` (Gemma4ClippableLinear's inner layer) to `*`, then
gguf's tensor map (`a.conv1d.{0,1}`, `a.input_projection`, `a.pre_encode.out`, `a.blk.N.{attn_q,attn_k,attn_v,
attn_out,attn_k_rel,per_dim_scale,ffn_up,ffn_down,ffn_up_1,...,conv_pw1,conv_dw,conv_pw2,...}`, the embedder's
projection `mm.a.input_projection`); the clipped linears' bounds as 1-element fp32 tensors; `per_dim_scale` through
softplus (transformers applies it at run time, clip reads it applied); the depthwise kernel (C, 1, K) as (C, K).

clip's gemma4a graph fixes what transformers reads from the config (12-frame chunks, 12 frames of left context and
none to the right, a logit cap of 50, half residuals, a 5-tap convolution, SiLU) and libmtmd computes the log-mel
frames itself at 16 kHz (20 ms windows, 10 ms hops, 128 bins up to 8 kHz); a model or feature extractor that
differs is refused (check_gemma4a). libmtmd takes the floor of its log-mel as max(mel, 1e-3) where transformers adds
1e-3, so the two differ slightly on near-silent bins; it cuts clips into 30-second pieces, as Gemma4Processor's
750-token limit does.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_mmproj_gemma4 import clip_tensor

PROJECTOR = "gemma4a"
# what clip's gemma4a graph and libmtmd's preprocessor hard-code: (config field, value)
TOWER_FIXED = (("attention_chunk_size", 12), ("attention_context_left", 13), ("attention_context_right", 0),
               ("attention_logit_cap", 50.0), ("residual_weight", 0.5), ("conv_kernel_size", 5),
               ("hidden_act", "silu"), ("rms_norm_eps", 1e-6))
EXTRACTOR_FIXED = (("sampling_rate", 16000), ("feature_size", 128), ("frame_length", 320), ("hop_length", 160),
                   ("min_frequency", 0.0), ("max_frequency", 8000.0), ("preemphasis", 0.0), ("fft_overdrive", False),
                   ("input_scale_factor", 1.0), ("mel_floor", 1e-3), ("per_bin_mean", None),
                   ("per_bin_stddev", None))


def check_gemma4a(model, extractor) -> None:
    """ConfigError, before anything is written, naming each setting of the audio tower's config or of `extractor`
    (the processor's audio feature extractor, or None) that differs from what clip's gemma4a computes with."""
    audio = model.hf_config.audio_config
    wrong = [f"audio_config.{k}={getattr(audio, k, None)!r} (llama.cpp: {v!r})" for k, v in TOWER_FIXED
             if getattr(audio, k, None) != v]
    if len(audio.subsampling_conv_channels) != 2:
        wrong.append(f"audio_config.subsampling_conv_channels={audio.subsampling_conv_channels!r} (llama.cpp: 2 "
                     f"convolutions)")
    for key, want in EXTRACTOR_FIXED if extractor is not None else ():
        got = getattr(extractor, key, None)
        got = got.item() if hasattr(got, "item") and getattr(got, "size", 2) == 1 else got
        if (got is None) != (want is None) or (want is not None and got != want):
            wrong.append(f"feature extractor {key}={got!r} (llama.cpp: {want!r})")
    if wrong:
        raise ConfigError(f"This Gemma 4 audio tower cannot be exported to llama.cpp's {PROJECTOR}, which fixes these "
                          f"settings: {'; '.join(wrong)}. Save the merged model with save_pretrained_merged "
                          f"instead.")


def gemma4a_tensor(short: str, t: torch.Tensor, n_blocks: int) -> tuple[str, torch.Tensor]:
    """clip's (name, tensor) for one of Gemma 4's audio tensors (`short`: transformers' name without "model.",
    starting "audio_tower." or "embed_audio.", fp32). Raises ConfigError for a tensor clip has no place for."""
    name = "model." + short
    name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
    if name.endswith("per_dim_scale"):  # a learned scale per head channel, softplus'd as clip multiplies it
        name, t = name + ".weight", torch.nn.functional.softplus(t)
    if name.endswith("depthwise_conv1d.weight"):  # (C, 1, K) -> (C, K), what ggml_ssm_conv takes
        t = t.reshape(t.shape[0], t.shape[-1])
    return clip_tensor(name, t, n_blocks, short, PROJECTOR)


def keep_f32(gguf_name: str) -> bool:
    """Whether clip needs this audio tensor in fp32 whatever the file's type: the subsampling convolutions and their
    norms, the input projection after them, the depthwise kernel (ggml_ssm_conv) and its norm (as the converter's
    tensor_force_quant keeps them)."""
    return gguf_name.startswith(("a.conv1d.", "a.input_projection.")) or ".conv_dw." in gguf_name or \
        ".norm_conv." in gguf_name


def write_gemma4a_metadata(writer, model) -> None:
    """clip's keys for the audio half of a Gemma 4 mmproj: the encoder's sizes, heads, norm eps and mel bins, and
    the text model's width the embedder projects to."""
    audio = model.hf_config.audio_config
    writer.add_clip_has_audio_encoder(True)
    writer.add_clip_audio_projector_type(PROJECTOR)
    writer.add_audio_projection_dim(int(model.config.hidden_size))
    writer.add_audio_embedding_length(int(audio.hidden_size))
    writer.add_audio_feed_forward_length(4 * int(audio.hidden_size))  # (the conformer's feed-forward: 4 x hidden)
    writer.add_audio_block_count(int(audio.num_hidden_layers))
    writer.add_audio_head_count(int(audio.num_attention_heads))
    writer.add_audio_attention_layernorm_eps(float(audio.rms_norm_eps))
    writer.add_audio_num_mel_bins(128)
