"""Falcon-H1 in llama.cpp's "falcon-h1" layout: attention and a Mamba-2 mixer side by side in every layer, with the
µP multipliers folded into the weights (sources: llama.cpp's convert_hf_to_gguf.py, FalconH1Model over Mamba2Model,
which folds them; src/models/falcon-h1.cpp and mamba-base.cpp, whose graph applies none of them at run time and
scales scores by head_dim ** -0.5).

Folded, as transformers' FalconH1ForCausalLM applies them:
- the embedding times embedding_multiplier, the output (lm_head, or the tied embedding written again as output)
  times lm_head_multiplier;
- attention_in_multiplier into q/k/v's weights (it scales their input, not their biases), key_multiplier into k's
  weight and bias, attention_out_multiplier into o_proj;
- ssm_in_multiplier into the Mamba in_proj, whose z / x / B / C / dt row sections also take ssm_multipliers (the
  mup_vector); ssm_out_multiplier into out_proj;
- the MLP's gate multiplier into gate_proj (weight and bias: it scales gate's output), its down multiplier into
  down_proj.
The Mamba tensors then take Granite 4.0's layout (export/gguf_granite.py); a conv without bias gets a zero bias, which
llama.cpp's graph adds unconditionally.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.export.gguf_granite import mamba_metadata, mamba_tensor

FALCON_H1 = "falcon-h1"
_MERGED = "Save the merged model with save_pretrained_merged instead. Nothing was written."


def check_falcon_h1(cfg) -> None:
    """ConfigError, before anything is written, for a Falcon-H1 config (a ModelConfig) that llama.cpp's falcon-h1
    would compute otherwise: attention biases (its graph drops o_proj's), Mamba projection biases (it reads none),
    the gated norm before the gate (it norms y * SiLU(z)), an activation other than SiLU."""
    if cfg.attn_bias or cfg.o_bias:
        raise ConfigError(f"This Falcon-H1 model has attention biases (attention_bias=true); llama.cpp's falcon-h1 "
                          f"leaves o_proj's bias out of its graph, so the GGUF would compute another model. {_MERGED}")
    if cfg.mamba_proj_bias:
        raise ConfigError(f"This Falcon-H1 model has biases on its Mamba in_proj / out_proj (projectors_bias=true); "
                          f"llama.cpp's falcon-h1 reads none, so the GGUF would compute another model. {_MERGED}")
    if cfg.mamba_rms_norm and cfg.mamba_norm_before_gate:
        raise ConfigError(f"This Falcon-H1 model norms its Mamba output before the gate (mamba_norm_before_gate=true "
                          f"with mamba_rms_norm=true); llama.cpp's falcon-h1 norms y * SiLU(z), after the gate, so the "
                          f"GGUF would compute another model. {_MERGED}")
    if cfg.hidden_act != "silu":
        raise ConfigError(f"This Falcon-H1 model's MLP uses hidden_act '{cfg.hidden_act}'; llama.cpp's falcon-h1 "
                          f"runs SiLU only, so the GGUF would compute another model. {_MERGED}")


def _in_proj_scale(cfg) -> torch.Tensor:
    """(2 * inner + 2 * groups * state + heads,) per-row factor of the Mamba in_proj: ssm_in_multiplier times the z, x,
    B, C and dt sections' ssm_multipliers (transformers' compute_mup_vector)."""
    inner, bc = cfg.mamba_heads * cfg.mamba_head_dim, cfg.mamba_groups * cfg.mamba_state
    sections = cfg.ssm_multipliers or (1.0,) * 5
    scale = torch.cat([torch.full((n,), float(m)) for n, m in zip((inner, inner, bc, bc, cfg.mamba_heads), sections)])
    return scale * cfg.parallel_multipliers[2]


def falcon_h1_tensors(name: str, t: torch.Tensor, cfg) -> list[tuple[str, torch.Tensor]]:
    """One merged Falcon-H1 tensor (transformers' name, fp32) -> [(the name gguf's tensor map knows for llama.cpp's
    falcon-h1, the tensor with its multipliers folded, in llama.cpp's layout)]: weights (out, in) scale by row."""
    attn_in, attn_out, _, ssm_out = cfg.parallel_multipliers
    gate_m, down_m = cfg.mlp_multipliers or (1.0, 1.0)
    key_m = cfg.scaling * cfg.head_dim ** 0.5  # (ModelConfig keeps key_multiplier in the attention scale)
    weight = name.endswith(".weight")
    if name == "model.embed_tokens.weight":
        out = [(name, t * cfg.embedding_multiplier)]
        if cfg.tie_embeddings:  # (llama.cpp would reuse the scaled embedding: the output is written on its own)
            out.append(("lm_head.weight", t / cfg.logits_scaling))
        return out
    if name == "lm_head.weight":
        return [(name, t / cfg.logits_scaling)]
    factor = 1.0
    if ".self_attn.o_proj." in name:
        factor = attn_out
    elif ".self_attn." in name:
        factor = (attn_in if weight else 1.0) * (key_m if ".k_proj." in name else 1.0)
    elif ".feed_forward." in name:
        factor = {"gate_proj": gate_m, "down_proj": down_m}.get(name.split(".")[-2], 1.0)
    elif ".mamba." in name:
        if name.endswith("in_proj.weight"):
            return [(name, t * _in_proj_scale(cfg).to(t)[:, None])]
        if name.endswith("out_proj.weight"):
            return [(name, t * ssm_out)]
        out = [mamba_tensor(name, t, cfg)]
        if name.endswith("conv1d.weight") and not cfg.conv_bias:
            out.append((name.replace(".weight", ".bias"), t.new_zeros(t.shape[0])))
        return out
    return [(name, t * factor if factor != 1.0 else t)]


def falcon_h1_metadata(writer, cfg) -> None:
    """The keys llama.cpp's falcon-h1 reads beyond the common ones (head counts, key/value length, feed-forward
    width, RMS eps): the Mamba-2 sizes (conv kernel, state, groups, inner width, heads as the time-step rank)."""
    mamba_metadata(writer, cfg)
