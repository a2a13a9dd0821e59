"""GGUF export for llama.cpp and Ollama, written directly with the `gguf` package (no llama.cpp build).

The merged weights (`merged_state_dict`: LoRA folded in) are renamed with gguf's own tensor-name tables and put in
the layout llama.cpp expects:
- llama/mistral ("llama" architecture): llama.cpp rotates adjacent pairs of q/k dimensions while transformers
  rotates the two halves, so q_proj/k_proj rows are reordered per head (half-split -> interleaved);
- gemma/gemma2/gemma3: RMSNorm weights (q/k norms included) are stored as 1 + w (llama.cpp multiplies by the
  weight as stored);
- qwen2/qwen3/gemma*/phi3 use the half-split rotation in llama.cpp too, so their q/k stay as they are;
- MoE (qwen3_moe -> "qwen3moe", mixtral -> "llama" with experts): the router `mlp.gate.weight` (E, H) is
  `ffn_gate_inp` (kept f32), the stacked experts `mlp.experts.gate_up_proj` (E, 2I, H) are split into
  `ffn_gate_exps` and `ffn_up_exps` (E, I, H) and `mlp.experts.down_proj` (E, H, I) is `ffn_down_exps`: 3-D
  tensors, ggml's ne = (in, out, E), as convert_hf_to_gguf.py stacks the per-expert weights; the quantizers run on
  their E * out rows. llama.cpp's MoE layers renormalise the top-k weights and have no dense layers.
- gpt_oss -> "gpt-oss": sinks as `attn_sinks.weight`, the biased router as `ffn_gate_inp`, the (E, in, out)
  experts with interleaved gate/up transposed and de-interleaved into `ffn_{gate,up,down}_exps` weights and biases
  (as convert_hf_to_gguf.py's GptOssModel does for unquantised experts); biases stay f32; configs llama.cpp's
  gpt-oss does not compute (SwiGLU alpha/limit, layer pattern) are ConfigErrors (export/gguf_layouts.py).
- falcon_h1 -> "falcon-h1": the µP multipliers folded into the weights, as llama.cpp's converter does
  (export/gguf_falcon_h1.py).
Metadata per architecture follows llama.cpp's loader (context, sizes, heads, head dim, RoPE base/scaling,
norm eps, Gemma 2/3 softcaps, sliding window and its per-layer pattern, Gemma 3's local RoPE base, the expert
count, experts per token and (qwen3moe) the experts' feed-forward length).
Vision-language models: the language model as above (Qwen2-VL / Qwen2.5-VL as "qwen2vl", Qwen3-VL as "qwen3vl")
and the vision tower in a second, "mmproj" file (export/gguf_mmproj.py).
Quantizations: f32, f16, bf16, and llama.cpp's quantized file types q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s,
q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, the non-linear iq4_nl and iq4_xs (export/iquants.py), and
for MoE models mxfp4_moe (llama-quantize's MXFP4_MOE:
experts in MXFP4 (export/mxfp4.py; a gpt-oss loaded from an MXFP4 checkpoint with its experts unchanged keeps
the checkpoint's blocks, as convert_hf_to_gguf.py does: export/gguf_mxfp4.py), the rest Q8_0; the type of
llama.cpp's own gpt-oss files). Each tensor gets the GGML type `llama-quantize` would give it
(export/gguf_types.py: output/embedding, "more bits" layers, fallbacks for rows that do not divide into blocks; 1-D
tensors stay f32; rows not divisible by 32 are f16) and is quantized by export/kquants.py, whose bytes equal
llama.cpp's quantizers, on the model's GPU when it has one. With `imatrix` the quantizers are weighted by an
importance matrix (export/imatrix.py: collected by our forward on sample text, or read from llama.cpp's file), as
`llama-quantize --imatrix` weights them; the per-tensor types do not change.

`quantization_method` is one name (case-insensitive; aliases such as fp16, float16, bfloat16, fp32, q8) or a
list/tuple of names (or a comma-separated string): the LoRA is merged once and one file per method is written
into one folder. Files are written to temporary names and renamed when all are complete; an Ollama `Modelfile`
(pointing at the first file) is written beside them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fasttune.atomic import remove_leftovers
from fasttune.errors import ConfigError, write_error
from fasttune.export.gguf_layouts import check_methods, check_supported, moe_layer_rule
from fasttune.export.gguf_falcon_h1 import FALCON_H1, falcon_h1_metadata
from fasttune.export.gguf_gemma4 import gemma4_rope_freqs, write_gemma4_metadata
from fasttune.export.gguf_granite import (GRANITE_HYBRID, NEMOTRON_H, NEMOTRON_H_MOE, granite_hybrid_metadata,
                                          nemotron_h_metadata)
from fasttune.export.gguf_mla import MLA_ARCHITECTURES, write_mla_metadata
from fasttune.export.gguf_qwen35 import DELTANET_ARCHITECTURES
from fasttune.export.gguf_qwen35 import write_metadata as qwen35_metadata
from fasttune.export.gguf_mmproj import (check_vision_supported, image_processor_of, is_vision_model, mmproj_target,
                                        mmproj_type, text_rows, write_mmproj)
from fasttune.export.gguf_parts import gguf_parts
from fasttune.export.gguf_types import ARCHITECTURES, IMATRIX_METHODS, METHODS, architecture
from fasttune.export.imatrix import check_imatrix, resolve_imatrix
from fasttune.sharding import writes_here

QUANTIZATIONS = ("f32", "f16", "bf16", *METHODS)
# Other spellings people use (Unsloth's and llama-quantize's included).
ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16",
           "not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "q8": "q8_0", "q4": "q4_0",
           "q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "mxfp4": "mxfp4_moe"}


def resolve_quantization(method: str, given=None) -> str:
    """One method name -> its canonical name ("Q8_0" -> "q8_0", "fp16" -> "f16", "q4_k" -> "q4_k_m"). Raises
    ConfigError listing the valid names for an unknown one; `given` is the whole list it came from, if any."""
    key = str(method).strip().lower()
    key = ALIASES.get(key, key)
    if key not in QUANTIZATIONS:
        hint = " Of the i-quants only iq4_nl and iq4_xs are written (the 1-3 bit ones need their lattice " \
               "searches); q4_k_m is the usual 4-bit choice." if key.startswith("iq") else ""
        where = f"quantization_method={given!r}: '{str(method).strip()}'" if given is not None else \
            f"quantization_method='{method}'"
        raise ConfigError(f"{where} is not supported; use one of {', '.join(QUANTIZATIONS)}.{hint}"
                          + (" Nothing was written." if given is not None else ""))
    return key


def resolve_quantizations(method) -> list[str]:
    """A name, a comma-separated string of names, or a list/tuple of names -> canonical names, duplicates
    dropped, in the given order. Every name is checked before anything is written: the ConfigError names the
    first unknown one and lists the valid names."""
    if not isinstance(method, (str, list, tuple)):
        raise ConfigError(f"quantization_method={method!r}: use a name such as 'q8_0' or a list of names such as "
                          f"['q8_0', 'f16'] (valid: {', '.join(QUANTIZATIONS)}).")
    names = method.split(",") if isinstance(method, str) else list(method)
    if not names or any(not str(m).strip() for m in names):
        raise ConfigError(f"quantization_method={method!r} names no method; use one of {', '.join(QUANTIZATIONS)}, "
                          f"or a list of them such as ['q8_0', 'f16'].")
    out = []
    for name in names:
        quant = resolve_quantization(name, given=method if is_method_list(method) else None)
        if quant not in out:
            out.append(quant)
    return out


def is_method_list(method) -> bool:
    """Whether quantization_method asks for a list of files (a list/tuple or a comma-separated string)."""
    return not isinstance(method, str) or "," in method


def _ggml_types(quant: str):
    import gguf

    t, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    if quant in METHODS:
        default, ftype = METHODS[quant]
        return t[default], f[ftype]
    return {"f32": (t.F32, f.ALL_F32), "f16": (t.F16, f.MOSTLY_F16), "bf16": (t.BF16, f.MOSTLY_BF16)}[quant]


def gguf_tensors(model, vision: dict | None = None) -> dict[str, torch.Tensor]:
    """Merged weights under GGUF names, in llama.cpp's layout (see module docstring). Full precision (fp32). For a
    vision-language model these are the language model's; its vision tower's and projector's go into `vision`
    (export/gguf_mmproj.py's names and layout) when a dict is given."""
    import gguf

    from fasttune.export.gguf_mmproj import split_vision
    from fasttune.export.merged import merged_state_dict

    cfg = model.arch
    arch = architecture(cfg)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_layers)
    tensors = merged_state_dict(model, model.dtype)
    if is_vision_model(model):
        moved = split_vision(model, tensors)
        if vision is not None:
            vision.update(moved)
    if "lm_head.weight" in tensors and arch in ("gemma", "gemma2"):  # (llama.cpp's gemma3 reads an output tensor)
        # llama.cpp's Gemma always reuses the embedding as output layer.
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ConfigError("This Gemma model has an lm_head that differs from its embeddings (e.g. trained with "
                              "modules_to_save=['lm_head']); llama.cpp's Gemma always uses the embeddings as output "
                              "layer, so it cannot be exported to GGUF. Export it with save_pretrained_merged.")
        del tensors["lm_head.weight"]
    out = {}
    for name in list(tensors):
        out.update(gguf_parts(name, tensors.pop(name).float(), cfg, arch, names))
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3":
        if arch not in ("llama", "exaone4", "apertus"):  # the architectures whose graphs read rope_freqs
            raise ConfigError(f"llama3 RoPE scaling in a '{cfg.model_type}' model has no GGUF form in llama.cpp.")
        from fasttune.kernels.rope import rope_inv_freq

        # llama.cpp divides each base frequency by its factor from this tensor.
        base = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, None)
        out["rope_freqs.weight"] = base / rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    if arch == "gemma4":
        out["rope_freqs.weight"] = gemma4_rope_freqs(cfg)
    if arch == "lfm2moe" and cfg.score_bias is None:  # llama.cpp's lfm2moe requires the routing bias: zeros choose
        for i in (i for i, sparse in enumerate(cfg.moe_layers) if sparse):  # by score alone, as the model does
            out[f"blk.{i}.exp_probs_b.bias"] = torch.zeros(cfg.num_experts)
    return out


def _mistral3_metadata(writer, cfg) -> None:
    """Ministral 3's yarn RoPE and Llama 4 query scaling under llama.cpp's mistral3 keys (its convert_hf_to_gguf
    writes rope_parameters' mscale_all_dim as yarn_log_multiplier and llama_4_scaling_beta as the attention
    temperature scale, the original context length as the scaling's)."""
    if cfg.rope_scaling:
        _yarn_metadata(writer, cfg, float(cfg.rope_scaling.get("mscale_all_dim", 0.0) or 0.0))
    if cfg.query_position_scale is not None:
        beta, original = cfg.query_position_scale
        writer.add_attn_temperature_scale(float(beta))
        writer.add_attn_temperature_length(int(original))


def _yarn_metadata(writer, cfg, log_multiplier: float | None) -> None:
    """yarn RoPE scaling of `cfg` under llama.cpp's keys: type, factor, original context length, beta_fast /
    beta_slow and, unless None, the log multiplier (its meaning differs by architecture in convert_hf_to_gguf:
    mscale_all_dim for mistral3, 0.1 * mscale_all_dim for deepseek2)."""
    import gguf

    rope = cfg.rope_scaling
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                      cfg.max_position_embeddings)))
    writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
    writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
    if log_multiplier is not None:
        writer.add_rope_scaling_yarn_log_mul(log_multiplier)


def _deepseek_routing_metadata(writer, cfg) -> None:
    """llama.cpp's keys for DeepSeek-V3's routing (GLM-4.5) and DeepSeek-V2's, as convert_hf_to_gguf writes them:
    sigmoid or softmax gating, the weights' scale and renormalisation, the expert groups, the shared experts as a
    count of expert widths, and the leading dense layers."""
    import gguf

    sigmoid = cfg.router_scoring == "sigmoid"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_weights_scale(float(cfg.routed_scaling))
    writer.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    writer.add_expert_group_count(int(cfg.router_groups[0]))
    writer.add_expert_group_used_count(int(cfg.router_groups[1]))
    writer.add_expert_shared_count(cfg.shared_expert_size // cfg.moe_intermediate_size)
    writer.add_leading_dense_block_count(cfg.moe_layers.index(True) if True in cfg.moe_layers else cfg.num_layers)


def _write_metadata(writer, model, name: str, file_type: int, quantized: bool):
    import gguf

    cfg = model.arch
    arch_name = architecture(cfg)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    if cfg.intermediate_size and not cfg.double_wide_mlp and not cfg.layer_kinds:  # (Qwen3.5-MoE: only experts'
        # widths; Nemotron-H: per layer, export/gguf_granite.py; Gemma 4 E2B:
        # one per layer, export/gguf_gemma4.py; Granite 4.0-H's experts read it, the shared MLP its own key)
        writer.add_feed_forward_length(cfg.moe_intermediate_size if cfg.shared_mlp_beside else cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    if architecture(cfg) in MLA_ARCHITECTURES:  # multi-query attention over the latent
        write_mla_metadata(writer, cfg)
        if cfg.rope_scaling:  # yarn (gguf_layouts.check_supported)
            all_dim = cfg.rope_scaling.get("mscale_all_dim")
            _yarn_metadata(writer, cfg, 0.1 * float(all_dim) if all_dim else None)
        if cfg.query_position_scale is not None:  # Mistral 4
            writer.add_attn_temperature_scale(float(cfg.query_position_scale[0]))
            writer.add_attn_temperature_length(int(cfg.query_position_scale[1]))
    elif architecture(cfg) == "gemma4":
        write_gemma4_metadata(writer, cfg)
    else:
        if cfg.model_type in ("lfm2", "lfm2_moe", "granitemoehybrid", "bamba"):  # llama.cpp's LFM2 and Granite 4.0 know
            # their convolution / Mamba layers by 0 kv heads
            writer.add_head_count_kv([0 if lin else cfg.num_kv_heads for lin in cfg.linear_layers])
        if cfg.model_type in ("lfm2", "lfm2_moe"):
            writer.add_shortconv_l_cache(cfg.linear_conv_kernel)
        elif cfg.model_type not in ("granitemoehybrid", "nemotron_h", "bamba"):
            writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.centered_norm:  # Cohere's LayerNorms (llama.cpp reads their eps under its LayerNorm key)
        writer.add_layer_norm_eps(cfg.rms_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(file_type))
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if cfg.model_type in ("gemma2", "gemma3_text"):
        if cfg.attn_logit_softcap:
            writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcap))
        if cfg.final_logit_softcap:
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcap))
        window = next((w for w in cfg.sliding_windows if w), None)
        if window:
            writer.add_sliding_window(int(window))
            writer.add_sliding_window_pattern([bool(w) for w in cfg.sliding_windows])
    if cfg.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(float(cfg.rope_local_theta))
    if cfg.mrope_section:  # Qwen-VL's multimodal RoPE: llama.cpp reads four sections (t, h, w, unused)
        writer.add_rope_dimension_sections([int(v) for v in cfg.mrope_section] + [0] * (4 - len(cfg.mrope_section)))
    if architecture(cfg) in DELTANET_ARCHITECTURES:
        qwen35_metadata(writer, cfg)
    if architecture(cfg) in ("qwen3vl", "qwen3vlmoe"):  # images bring a DeepStack feature per layer
        writer.add_num_deepstack_layers(len(model.hf_config.vision_config.deepstack_visual_indexes))
    if cfg.model_type == "apertus":  # per-layer xIELU scalars, as stored (before softplus), as llama.cpp reads them
        acts = [layer.mlp.act_fn for layer in model.model.layers]
        writer.add_xielu_alpha_p([float(a.alpha_p) for a in acts])
        writer.add_xielu_alpha_n([float(a.alpha_n) for a in acts])
        writer.add_xielu_beta([float(a.beta) for a in acts])
        writer.add_xielu_eps([float(a.eps) for a in acts])
    if arch_name == GRANITE_HYBRID:
        granite_hybrid_metadata(writer, cfg)
    elif arch_name in (NEMOTRON_H, NEMOTRON_H_MOE):
        nemotron_h_metadata(writer, cfg)
    elif arch_name == FALCON_H1:
        falcon_h1_metadata(writer, cfg)
    if cfg.model_type == "granite":  # llama.cpp's granite reads the four multipliers (the logit one divides)
        writer.add_embedding_scale(float(cfg.embedding_multiplier))
        writer.add_residual_scale(float(cfg.residual_multiplier))
        writer.add_attention_scale(float(cfg.scaling))
        writer.add_logit_scale(float(cfg.logits_scaling))
    if cfg.model_type in ("cohere", "cohere2"):  # llama.cpp's command-r / cohere2 multiply the logits by logit_scale
        # (granite's divides)
        writer.add_logit_scale(1.0 / float(cfg.logits_scaling))
    if architecture(cfg) in ("olmo2", "exaone4", "cohere2") and any(cfg.sliding_windows):  # (checked)
        writer.add_sliding_window(int(next(w for w in cfg.sliding_windows if w)))
    if architecture(cfg) == "gpt-oss":
        writer.add_sliding_window(int(next(w for w in cfg.sliding_windows if w)))
        if cfg.rope_scaling:  # yarn (gguf_layouts.check_supported)
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling.get("original_max_position_embeddings", 4096)))
    if architecture(cfg) == "mistral3":
        _mistral3_metadata(writer, cfg)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if architecture(cfg) in ("qwen3moe", "qwen3vlmoe", "gpt-oss", "qwen35moe", "glm4moe", "qwen3next",
                                             "deepseek2", "gemma4", "mistral4", "lfm2moe", "ernie4_5-moe",
                                             "nemotron_h_moe"):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)  # (llama's: its FFN length)
        if cfg.router_scoring in ("sigmoid", "softmax_grouped", "softmax_pairs"):  # DeepSeek-V3's, V2's, Mistral 4's
            _deepseek_routing_metadata(writer, cfg)
        elif arch_name == "ernie4_5-moe":  # llama.cpp's rule: sparse from the first MoE layer, every step-th
            start, step = moe_layer_rule(cfg)
            writer.add_leading_dense_block_count(start)
            writer.add_interleave_moe_layer_step(step)
            writer.add_expert_shared_count(cfg.shared_expert_size // cfg.moe_intermediate_size)  # (the converter's)
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_size)  # (what llama.cpp reads)
        elif cfg.shared_expert_size:
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_size)


def tensor_type(gguf_name: str, t: torch.Tensor, quant: str, tied_output: bool, cfg=None, imatrix: bool = False):
    """The GGML type (gguf.GGMLQuantizationType) one tensor is stored in for a quantization_method: f32/f16/bf16
    as named (1-D tensors f32), the quantized methods as llama-quantize chooses per tensor (gguf_types.py), which
    needs the model's ModelConfig `cfg` (architecture, layers, heads) and whether an imatrix is used."""
    import gguf

    from fasttune.export import gguf_types

    kind = gguf.GGMLQuantizationType
    if t.dim() == 1 or gguf_name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", ".bias",
                                           "ssm_conv1d.weight", "shortconv.conv.weight", "_norm.weight",
                                           ".ssm_a", ".ssm_d")):
        return kind.F32  # norms (Command R+'s q/k norms are (heads, head_dim)), biases, rope factors, MoE routers,
        # convs: small, and llama.cpp keeps them in f32 (its CPU kernels multiply by no 16-bit norm)
    if quant not in METHODS:
        return _ggml_types(quant)[0]
    name = gguf_types.tensor_type(gguf_name, tuple(t.shape), quant, arch=architecture(cfg),
                                  n_layer=cfg.num_layers, n_head=cfg.num_heads, n_head_kv=cfg.num_kv_heads,
                                  tied=tied_output, n_expert=cfg.num_experts, imatrix=imatrix)
    return kind[name]


def encode_tensor(t: torch.Tensor, ggml_type, device=None, imatrix: torch.Tensor | None = None):
    """(array, raw_dtype) for GGUFWriter.add_tensor. Block types are quantized by kquants.quantize (llama.cpp's
    bytes) on `device` (default: the tensor's); `imatrix` (t.shape[-1],) float32, the tensor's importance weights,
    or (E, t.shape[-1]) for an (E, out, in) expert stack (each expert's rows by its own, as llama-quantize slices
    a MoE imatrix), selects ggml's weighted quantizers (ignored by Q8_0 and the float types)."""
    import gguf

    from fasttune.export.kquants import quantize

    kind = gguf.GGMLQuantizationType
    if ggml_type == kind.F32:
        return t.float().numpy(), None
    if ggml_type == kind.F16:
        return t.to(torch.float16).numpy(), None
    if ggml_type == kind.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy(), kind.BF16
    t = t if device is None else t.to(device)
    if imatrix is not None and imatrix.dim() == 2:  # an expert stack: expert e's rows by its own weights
        import numpy as np

        data = np.concatenate([quantize(t[e], ggml_type.name, imatrix[e]) for e in range(t.shape[0])])
    else:
        data = quantize(t, ggml_type.name, imatrix)
    return data.reshape(*t.shape[:-1], -1), ggml_type  # 3-D MoE experts keep their (E, out) rows


def _default_tokenizer(model):
    """The tokenizer saved beside the model's weights (a vision-language model's processor, tokenizer and image
    processor, when the folder has one). Raises ConfigError when there is no tokenizer."""
    from fasttune.models.hf_files import load_tokenizer

    source = model.name_or_path
    tok = load_tokenizer(Path(source), required=False) if source and Path(source).exists() else None
    if tok is None:
        raise ConfigError("GGUF export needs the tokenizer: pass it, as in model.save_pretrained_gguf(path, "
                          "tokenizer).")
    if is_vision_model(model) and (Path(source) / "preprocessor_config.json").exists():
        from fasttune.data.vision import VisionProcessor
        from fasttune.data.vision_settings import processor_settings

        return VisionProcessor.from_pretrained(source, tokenizer=tok, **processor_settings(model.hf_config, tok))
    return tok


def gguf_model_name(model) -> str:
    """general.name for the GGUF: the base model's name (last part of its path or hub id, without .gguf), with
    characters other than letters, digits, '.', '_' and '-' replaced, and the parts that name another llama.cpp
    architecture (a llama model in a folder "phi3-ft") dropped: llama.cpp keys behaviour on such names, so a
    misleading one can make the file fail to load. "fasttune-model" when nothing is left."""
    import gguf

    raw = Path(str(model.name_or_path or "")).name.removesuffix(".gguf")
    own = ARCHITECTURES.get(model.arch.model_type, "")
    others = {a for a in gguf.MODEL_ARCH_NAMES.values() if len(a) >= 4 and a not in own and own not in a}
    parts = [p for p in re.split(r"[^A-Za-z0-9.]+", raw)
             if p and not any(o in p.lower().replace("-", "").replace(".", "") for o in others)]
    return "-".join(parts) or "fasttune-model"


def gguf_target(path, quant: str, several: bool = False) -> Path:
    """Where one method's file goes. `*.gguf` is the file itself (with several methods: `<stem>.<QUANT>.gguf`
    beside it); anything else is a folder that gets `model.<QUANT>.gguf`."""
    path = Path(path)
    if path.suffix != ".gguf":
        return path / f"model.{quant.upper()}.gguf"
    return path.with_name(f"{path.stem}.{quant.upper()}.gguf") if several else path


def _write_file(tmp: Path, model, name: str, vocab, tensors: dict, quant: str, bar, consume: bool, im=None,
                packed: dict | None = None):
    """One GGUF file of the merged `tensors` (GGUF name -> fp32 tensor) in `quant`; `consume` pops them to free
    memory as they are encoded (the last method). `im`: an Imatrix whose entries weight the quantizers. `packed`:
    GGUF name -> MXFP4 bytes to write as they are where the tensor's type is MXFP4 (export/gguf_mxfp4.py)."""
    import gguf

    cfg = model.arch
    writer = gguf.GGUFWriter(str(tmp), architecture(cfg))
    _write_metadata(writer, model, name, _ggml_types(quant)[1], quant not in ("f32", "f16", "bf16"))
    im = im if quant in IMATRIX_METHODS else None
    if im is not None:  # the keys llama-quantize writes when it is given an imatrix
        writer.add_string("quantize.imatrix.file", "(collected by fasttune)")
        writer.add_string("quantize.imatrix.dataset", ", ".join(im.datasets) or "(unknown)")
        writer.add_int32("quantize.imatrix.entries_count", len(im.sums))
        writer.add_int32("quantize.imatrix.chunks_count", int(im.chunk_count))
    vocab.write(writer)
    tied = "output.weight" not in tensors
    bar.set_description(f"GGUF {quant}")
    device = model.device if getattr(model.device, "type", "cpu") == "cuda" else None
    for gname in list(tensors):
        t = tensors.pop(gname) if consume else tensors[gname]
        kind = tensor_type(gname, t, quant, tied, cfg, imatrix=im is not None)
        weights = im.weights(gname) if im is not None else None
        if packed and kind == gguf.GGMLQuantizationType.MXFP4 and gname in packed:
            data, raw = packed[gname].reshape(*t.shape[:-1], -1), kind  # the checkpoint's own blocks
        else:
            data, raw = encode_tensor(t, kind, device, weights)
        writer.add_tensor(gname, data, raw_dtype=raw)
        bar.update(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def save_gguf(model, path, tokenizer=None, quantization_method="q8_0", progress: bool = True,
              modelfile: bool = True, imatrix=None, imatrix_tokens: int | None = None) -> Path | list[Path]:
    """Write GGUF file(s) of `model` (LoRA merged in) and an Ollama Modelfile beside them.

    path: a `.gguf` file, or a folder that gets `model.<QUANT>.gguf`. quantization_method: one name (f32, f16,
    bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl,
    iq4_xs, and
    mxfp4_moe for MoE models (experts in MXFP4, the rest Q8_0, as llama-quantize's MXFP4_MOE);
    case-insensitive, aliases fp16/float16/bfloat16/fp32/q8/q4/q4_k/q5_k/q3_k/quantized/mxfp4) or a list/tuple of names
    (or "q4_k_m,q8_0"): one file per method, the merge done once; the quantized methods give each tensor the type
    llama.cpp's llama-quantize gives it, with the same bytes; with a `.gguf` path the files are
    `<stem>.<QUANT>.gguf` beside it. The Modelfile's FROM is the first file. Returns the file's Path for one
    name, the list of Paths (in the given order) for a list. Raises ConfigError for an unknown method or
    mxfp4_moe on a model without experts (before anything is written), an unsupported model, or a failed write;
    files are renamed into place only when all are complete, so a failure leaves none. mxfp4_moe on a gpt-oss
    loaded from an MXFP4 checkpoint whose experts are unchanged writes the checkpoint's blocks (export/gguf_mxfp4.py).
    A vision-language model (Gemma 3 / 4, Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5, Mistral 3, InternVL,
    SmolVLM / Idefics3, LLaVA with a SigLIP tower; pass its processor as `tokenizer`)
    gets an mmproj file beside the first (export/gguf_mmproj.py: `mmproj.F16.gguf`, f32 when f32 is among the
    methods), named by the Modelfile's second FROM line; towers llama.cpp cannot compute are a ConfigError before
    anything is written.

    imatrix: quantize with an importance matrix, as llama-quantize --imatrix does (export/imatrix.py): sample text
    to measure it on (a .txt, .jsonl/.json/.csv/.parquet file or dataset folder, a list of strings or rows, a
    datasets.Dataset; up to `imatrix_tokens` tokens, default 4096, through this model with its LoRA), a llama.cpp
    imatrix .gguf file, or an export.imatrix.Imatrix. It weights the quantizers of the `blk.N.*` matrices in the
    methods that use one (all but f32/f16/bf16/q8_0; a ConfigError when none of the methods does); the types
    chosen per tensor stay those of the method."""
    from tqdm import tqdm

    from fasttune.export.gguf_vocab import gguf_vocab
    from fasttune.export.modelfile import ollama_modelfile

    quants = resolve_quantizations(quantization_method)
    cfg = model.arch
    check_supported(cfg)
    check_methods(cfg, quants)
    vlm = is_vision_model(model)
    processor = tokenizer if tokenizer is not None else _default_tokenizer(model)
    if vlm:
        check_vision_supported(model, processor)
        image_processor_of(processor)  # its mean and std go into the mmproj: fail before writing anything
    tokenizer = getattr(processor, "tokenizer", processor)  # a vision-language model's processor wraps it
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, ARCHITECTURES.get(cfg.model_type))
    targets = [gguf_target(path, q, several=len(quants) > 1) for q in quants]
    if not writes_here(model):  # a distributed run: rank 0 writes the files, the other ranks return their names
        return targets if is_method_list(quantization_method) else targets[0]
    # a vision-language model's tower and projector: one mmproj file beside the text model's (f16, or f32 if asked)
    mm_type = mmproj_type(quants)
    projector = mmproj_target(targets[0], mm_type) if vlm else None
    model_text = ollama_modelfile(targets[0].name, tokenizer, projector.name if vlm else None) if modelfile else None
    name = gguf_model_name(model)

    im = resolve_imatrix(model, tokenizer, imatrix, quants, imatrix_tokens, progress)

    folder = targets[0].parent
    finals = [*targets, *([projector] if vlm else [])]
    tmps = [t.with_name(f".{t.name}.tmp-{os.getpid()}") for t in finals]
    tmp_modelfile = folder / f".Modelfile.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for target in (*finals, folder / "Modelfile"):  # what an earlier export that was killed left behind
            remove_leftovers(folder, f".{target.name}.tmp-*")
        vision = {}
        tensors = gguf_tensors(model, vision)
        if vlm:
            vision.update(text_rows(model, processor, tensors))
            write_mmproj(tmps[-1], model, processor, vision, mm_type, name)
            del vision
        if im is not None:
            check_imatrix(im, tensors)
        packed = {}
        if "mxfp4_moe" in quants and architecture(cfg) == "gpt-oss":
            from fasttune.export.gguf_mxfp4 import checkpoint_mxfp4_experts

            packed = checkpoint_mxfp4_experts(model, tensors)  # unchanged experts of an MXFP4 checkpoint
        with tqdm(total=len(quants) * len(tensors), unit="tensor", disable=not progress) as bar:
            for i, (quant, tmp) in enumerate(zip(quants, tmps)):
                _write_file(tmp, model, name, vocab, tensors, quant, bar, consume=i == len(quants) - 1, im=im,
                            packed=packed)
        if model_text is not None:
            tmp_modelfile.write_text(model_text)
        for tmp, target in zip(tmps, finals):
            os.replace(tmp, target)
        if model_text is not None:
            os.replace(tmp_modelfile, folder / "Modelfile")
    except OSError as e:  # disk full, no permission, ...: one paragraph naming the file (no partial file left)
        what, where = ("the GGUF file", targets[0]) if len(targets) == 1 else ("the GGUF files", folder)
        raise write_error(e, what, where) from None
    finally:
        for leftover in (*tmps, tmp_modelfile):
            if leftover.exists():
                leftover.unlink()
    return targets if is_method_list(quantization_method) else targets[0]
