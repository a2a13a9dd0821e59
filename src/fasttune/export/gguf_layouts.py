"""Which models llama.cpp computes as they are: GGUF export's checks before anything is written.

llama.cpp fixes some layouts in its code rather than reading them from the file (sources: llama.cpp's
src/llama-model.cpp and src/models/*.cpp): SmolLM3's NoPE step of 4, OLMo 3's and EXAONE 4's "every 4th layer
full" sliding pattern (EXAONE 4 only at 64 layers), gpt-oss's SwiGLU constants and alternating layers, Gemma 2/3's
query scale, and biases absent from some architectures. A model that differs is a ConfigError pointing to
save_pretrained_merged; a sliding window llama.cpp drops is a warning. Tested through save_pretrained_gguf
(tests/export/test_gguf.py).
"""
from __future__ import annotations

import math
import warnings

from fasttune.errors import ConfigError
from fasttune.export.gguf_falcon_h1 import FALCON_H1, check_falcon_h1
from fasttune.export.gguf_mmproj import PROJECTORS
from fasttune.export.gguf_qwen35 import DELTANET_ARCHITECTURES, full_attention_interval
from fasttune.export.gguf_types import ARCHITECTURES, MOE_METHODS, SMOLLM3_NOPE_STEP, architecture
from fasttune.models.config import VISION_TEXT_FAMILIES

# llama.cpp scales Gemma 2/3 queries by head_dim ** -0.5, except for the 27B models (known by their layer count),
# whose query_pre_attn_scalar is hidden / heads.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp architectures that read no q/k/v/o or MLP biases
WITHOUT_BIASES = ("olmo2", "ernie4_5", "ernie4_5-moe", "gemma4")
COMMAND_R_PLUS_LAYERS = 64  # llama.cpp's command-r: q/k norms read (and required) from this many layers on
FULL_EVERY = 4  # llama.cpp's olmo2 and exaone4 with a sliding window: layer i attends fully when (i + 1) % 4 == 0


def _every_fourth_full(cfg, window) -> bool:
    """Whether the model slides with `window` in every layer but each FULL_EVERY-th, llama.cpp's fixed layout."""
    return list(cfg.sliding_windows) == [None if (i + 1) % FULL_EVERY == 0 else window for i in range(cfg.num_layers)]


def check_supported(cfg) -> None:
    """ConfigError when llama.cpp has no architecture for `cfg` (a ModelConfig), or its architecture would compute
    another model (layer layouts, biases, RoPE scaling, MoE routing it does not have); a warning when llama.cpp
    drops a sliding window. Raises before anything is written."""
    if getattr(cfg, "cross_attention_layers", None):
        raise ConfigError("GGUF export: llama.cpp has no architecture for Llama 3.2 Vision's cross-attention layers "
                          "(mllama). Save merged safetensors instead (save_pretrained_merged / fasttune export "
                          "--format merged), which transformers and vLLM load.")
    if cfg.model_type not in ARCHITECTURES:
        text = [t for t in ARCHITECTURES if t not in VISION_TEXT_FAMILIES]  # those come with their vision tower
        *vlms, last = PROJECTORS
        raise ConfigError(f"GGUF export supports the families {', '.join(text)} and the vision-language models "
                          f"{', '.join(vlms)} and {last}; this model is '{cfg.model_type}'.")
    arch = architecture(cfg)
    if arch in GEMMA_27B_LAYERS:
        big = cfg.num_layers == GEMMA_27B_LAYERS[arch]
        expected = (cfg.hidden_size / cfg.num_heads if big else cfg.head_dim) ** -0.5
        if not math.isclose(cfg.scaling, expected, rel_tol=1e-6):
            raise ConfigError(f"This {arch} model scales queries by {cfg.scaling:.6g} (query_pre_attn_scalar) but "
                              f"llama.cpp would use {expected:.6g}; it cannot be exported to GGUF faithfully.")
    elif arch == "gpt-oss":
        _check_gpt_oss(cfg)
    elif arch in DELTANET_ARCHITECTURES:
        full_attention_interval(cfg)  # raises for layer patterns and head sizes llama.cpp cannot run
    if arch == "smollm3" and cfg.rope_layers != [(i + 1) % SMOLLM3_NOPE_STEP != 0 for i in range(cfg.num_layers)]:
        nope = [i for i, rope in enumerate(cfg.rope_layers) if not rope]
        raise ConfigError(f"This SmolLM3 model has no RoPE in layers {nope} (no_rope_layers); llama.cpp's smollm3 "
                          f"always leaves it out of every {SMOLLM3_NOPE_STEP}th layer and reads no pattern from the "
                          f"file, so the GGUF would compute another model. Save the merged model with "
                          f"save_pretrained_merged instead. Nothing was written.")
    if arch == "granitehybrid":
        _check_granite_hybrid(cfg)
    elif arch == FALCON_H1:
        check_falcon_h1(cfg)
    if arch == "ernie4_5-moe":
        moe_layer_rule(cfg)
    if arch in ("lfm2", "lfm2moe") and cfg.conv_bias:
        raise ConfigError("This LFM2 model has biases on its short convolutions (conv_bias=true); llama.cpp's lfm2 "
                          "reads none, so the GGUF would compute another model. Save the merged model with "
                          "save_pretrained_merged instead. Nothing was written.")
    if arch in WITHOUT_BIASES and (cfg.attn_bias or cfg.o_bias or cfg.mlp_bias):
        raise ConfigError(f"This {cfg.model_type} model has biases (attention_bias / mlp_bias / use_bias); "
                          f"llama.cpp's {arch} reads none, so it cannot be exported to GGUF. Save the merged model "
                          f"with save_pretrained_merged instead.")
    if arch == "seed_oss" and (cfg.o_bias or cfg.mlp_bias):
        raise ConfigError("This Seed-OSS model has biases on o_proj or the MLP (attention_out_bias / mlp_bias); "
                          "llama.cpp's seed_oss reads only the q/k/v biases, so the GGUF would not load. Save the "
                          "merged model with save_pretrained_merged instead. Nothing was written.")
    if arch == "command-r" and cfg.qk_norm != (cfg.num_layers >= COMMAND_R_PLUS_LAYERS):
        raise ConfigError(f"This Cohere model has {cfg.num_layers} layers {'with' if cfg.qk_norm else 'without'} q/k "
                          f"norms (use_qk_norm); llama.cpp's command-r reads q/k norms exactly when a model has "
                          f"{COMMAND_R_PLUS_LAYERS} layers or more (Command R+'s layout), so the GGUF would not load. "
                          f"Save the merged model with save_pretrained_merged instead. Nothing was written.")
    if arch == "cohere2":
        window = next((w for w in cfg.sliding_windows if w), None)
        if window is None or not _every_fourth_full(cfg, window):
            raise ConfigError(f"This Cohere 2 model's layer_types {cfg.sliding_windows} are not 'three sliding "
                              f"layers, then a full one', the only layout llama.cpp's cohere2 reads; save the merged "
                              f"model with save_pretrained_merged instead. Nothing was written.")
    if arch == "olmo2":
        _check_olmo(cfg)
    elif arch == "exaone4":
        _check_exaone4(cfg)
    elif arch not in ("gpt-oss", "gemma4", "cohere2") and arch not in GEMMA_27B_LAYERS and any(cfg.sliding_windows):
        window = next(w for w in cfg.sliding_windows if w)
        warnings.warn(f"llama.cpp's '{arch}' architecture has no sliding-window attention: the GGUF attends over "
                      f"the whole context, which equals this model only for sequences up to {window} tokens.")
    yarn_ok = arch in ("deepseek2", "mistral4") and cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "yarn"
    # Gemma 4's full layers: proportional RoPE as a rope_freqs tensor (export/gguf_gemma4.py)
    yarn_ok = yarn_ok or (arch == "gemma4" and cfg.rope_scaling["rope_type"] == "proportional")
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] not in ("linear", "llama3") and \
            arch not in ("gpt-oss", "mistral3") and not yarn_ok:
        raise ConfigError(f"RoPE scaling '{cfg.rope_scaling['rope_type']}' has no GGUF form here.")
    if arch in ("deepseek2", "mistral4") and not cfg.q_lora_rank:
        raise ConfigError("This model's latent attention has no query latent (q_lora_rank is None, one q_proj); "
                          "llama.cpp's deepseek2 reads attn_q only for DeepSeek-V2-Lite's 27 layers, so the GGUF "
                          "would not load. Save the merged model with save_pretrained_merged instead. Nothing was "
                          "written.")
    if arch == "lfm2moe" and (cfg.routed_scaling != 1.0 or not cfg.norm_topk_prob):
        raise ConfigError(f"This LFM2-MoE model {'scales' if cfg.routed_scaling != 1.0 else 'does not renormalise'} "
                          f"its routing weights (routed_scaling_factor={cfg.routed_scaling:g}, "
                          f"norm_topk_prob={cfg.norm_topk_prob}); llama.cpp's lfm2moe always renormalises and never "
                          f"scales them, so the GGUF would compute another model. Save the merged model with "
                          f"save_pretrained_merged instead. Nothing was written.")
    if cfg.router_scoring == "softmax_grouped" and cfg.router_groups[0] > 1:
        raise ConfigError("This DeepSeek-V2 model routes with topk_method 'group_limited_greedy' (expert groups ranked "
                          "by their best score); llama.cpp's deepseek2 ranks groups by their two best scores "
                          "(DeepSeek-V3's rule), so the GGUF would route tokens differently. Save the merged model "
                          "with save_pretrained_merged instead. Nothing was written.")
    if arch in ("glm4moe", "deepseek2", "mistral4", "lfm2moe"):
        _check_leading_dense(cfg)
    elif cfg.num_experts and arch not in ("gpt-oss", "gemma4", "ernie4_5-moe", "nemotron_h_moe"):  # (Gemma 4: experts
        # beside every dense MLP; ERNIE 4.5 MoE: its own layer rule, moe_layer_rule; Nemotron 3: its layer kinds)
        if not all(cfg.moe_layers):
            dense = [i for i, moe in enumerate(cfg.moe_layers) if not moe]
            raise ConfigError(f"This {cfg.model_type} model has dense MLP layers ({', '.join(map(str, dense))}: "
                              f"mlp_only_layers / decoder_sparse_step) between its MoE layers; llama.cpp's "
                              f"'{arch}' architecture makes every layer sparse, so it cannot be exported to GGUF. "
                              f"Save the merged model with save_pretrained_merged instead.")
        if not cfg.norm_topk_prob:
            raise ConfigError(f"This {cfg.model_type} model does not renormalise its top-{cfg.num_experts_per_tok} "
                              f"routing weights (norm_topk_prob=False); llama.cpp's '{arch}' architecture always "
                              f"does, so the GGUF would compute another model. Save the merged model with "
                              f"save_pretrained_merged instead.")


def _check_leading_dense(cfg) -> None:
    """llama.cpp's glm4moe and deepseek2: leading_dense_block_count dense layers, then every layer sparse."""
    first = cfg.moe_layers.index(True) if True in cfg.moe_layers else cfg.num_layers
    if cfg.moe_layers != [i >= first for i in range(cfg.num_layers)]:
        raise ConfigError(f"This {cfg.model_type} model's sparse layers {cfg.moe_layers} are not 'dense first, then "
                          f"sparse' (first_k_dense_replace), the only layout llama.cpp's "
                          f"{architecture(cfg)} reads; save the merged model with save_pretrained_merged "
                          f"instead. Nothing was written.")


def check_methods(cfg, quants: list[str]) -> None:
    """ConfigError for a method that does not fit the model: mxfp4_moe (MXFP4 experts) on a model without experts,
    which llama-quantize would write as Q8_0 throughout."""
    for quant in quants:
        if quant in MOE_METHODS and not cfg.num_experts:
            raise ConfigError(f"quantization_method '{quant}' stores the experts of a mixture-of-experts model in "
                              f"MXFP4 (and the other tensors in Q8_0); this {cfg.model_type} model has no experts. "
                              f"Use 'q8_0' (the same file for a dense model), or a 4-bit method such as 'q4_k_m'. "
                              f"Nothing was written.")


def _check_olmo(cfg):
    """ConfigError for an OLMo 3 layout llama.cpp's 'olmo2' does not compute: its sliding windows are one size in
    every layer but each FULL_EVERY-th, which attends to everything."""
    window = next((w for w in cfg.sliding_windows if w), None)
    if window is not None and not _every_fourth_full(cfg, window):
        raise ConfigError(f"llama.cpp's olmo2 slides every layer but each {FULL_EVERY}th (one window size); "
                          f"this {cfg.model_type} model's layer_types / sliding_window differ, so it cannot be "
                          f"exported to GGUF. Save the merged model with save_pretrained_merged instead.")


def _check_exaone4(cfg):
    """ConfigError for an EXAONE 4 layout llama.cpp's exaone4 does not compute: it slides only in 64-layer models
    (EXAONE 4.0 32B), every layer but each 4th, and then rotates only the sliding layers; without a window every
    layer rotates."""
    window = next((w for w in cfg.sliding_windows if w), None)
    if window is None:
        if not all(cfg.rope_layers or [True]):
            raise ConfigError("This exaone4 model has no sliding layers but leaves RoPE out of some (sliding_window "
                              "is set while layer_types are all full); llama.cpp's exaone4 would rotate every "
                              "layer, so it cannot be exported to GGUF. Save the merged model with "
                              "save_pretrained_merged instead.")
        return
    if cfg.num_layers != 64 or not _every_fourth_full(cfg, window):
        raise ConfigError(f"llama.cpp's exaone4 applies sliding windows only to 64-layer models (EXAONE 4.0 32B), "
                          f"in every layer but each 4th; this model has {cfg.num_layers} layers with "
                          f"layer_types {['sliding' if w else 'full' for w in cfg.sliding_windows]}, so it cannot "
                          f"be exported to GGUF. Save the merged model with save_pretrained_merged instead.")


def _check_gpt_oss(cfg):
    """ConfigError for a gpt-oss model whose computation llama.cpp's 'gpt-oss' architecture does not reproduce:
    llama.cpp fixes the SwiGLU's alpha and limit, alternates sliding (even layers) and full attention, and takes
    YaRN RoPE (or none)."""
    if not math.isclose(cfg.swiglu_alpha, 1.702, rel_tol=1e-6) or not math.isclose(cfg.swiglu_limit, 7.0,
                                                                                      rel_tol=1e-6):
        raise ConfigError(f"This gpt-oss model's SwiGLU has alpha {cfg.swiglu_alpha} and limit {cfg.swiglu_limit}; "
                          f"llama.cpp's gpt-oss fixes them at 1.702 and 7.0, so it cannot be exported to GGUF.")
    windows = list(cfg.sliding_windows)
    window = next((w for w in windows if w), None)
    if window is None or any(bool(w) != (i % 2 == 0) for i, w in enumerate(windows)) \
            or any(w and w != window for w in windows):
        raise ConfigError("llama.cpp's gpt-oss alternates sliding-window attention (even layers, one window) and "
                          "full attention (odd layers); this model's layer_types differ, so it cannot be exported "
                          "to GGUF.")
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] != "yarn":
        raise ConfigError(f"RoPE scaling '{cfg.rope_scaling['rope_type']}' in a gpt-oss model has no GGUF form "
                          f"in llama.cpp (its gpt-oss takes YaRN).")
    if not all(cfg.moe_layers) or not cfg.attn_sinks:
        raise ConfigError("llama.cpp's gpt-oss has attention sinks and MoE MLPs in every layer; this model does "
                          "not, so it cannot be exported to GGUF.")


def _check_granite_hybrid(cfg) -> None:
    """llama.cpp's granitehybrid runs Mamba-2 layers twice as wide as the model (mamba_expand 2, asserted in its
    graph) without projection biases, and attention without biases."""
    inner = cfg.mamba_heads * cfg.mamba_head_dim
    if any(cfg.linear_layers) and inner != 2 * cfg.hidden_size:
        raise ConfigError(f"This Granite 4.0 model's Mamba layers are {inner} channels wide for hidden size "
                          f"{cfg.hidden_size} (mamba_expand {inner / cfg.hidden_size:g}); llama.cpp's granitehybrid "
                          f"runs only mamba_expand 2 (Granite 4.0's), so the GGUF would not load. Save the merged "
                          f"model with save_pretrained_merged instead. Nothing was written.")
    if cfg.mamba_proj_bias or cfg.attn_bias or cfg.o_bias:
        raise ConfigError("This Granite 4.0 model has biases (mamba_proj_bias / attention_bias); llama.cpp's "
                          "granitehybrid reads none, so the GGUF would compute another model. Save the merged model "
                          "with save_pretrained_merged instead. Nothing was written.")


def moe_layer_rule(cfg) -> tuple[int, int]:
    """(first MoE layer, step) of llama.cpp's ernie4_5-moe rule, layer i sparse when i >= first and (i + 1) % step
    == 0, that gives cfg.moe_layers; ConfigError when none does (an ERNIE 4.5 MoE model whose moe_layer_end_index
    stops before the last layer)."""
    layers = list(cfg.moe_layers)
    first = layers.index(True) if True in layers else cfg.num_layers
    for step in range(1, cfg.num_layers + 1):
        if layers == [i >= first and (i + 1) % step == 0 for i in range(cfg.num_layers)]:
            return first, step
    raise ConfigError(f"This {cfg.model_type} model's MoE layers ({[i for i, m in enumerate(layers) if m]}) do not "
                      f"follow llama.cpp's rule (every step-th layer from the first MoE layer to the last: "
                      f"moe_layer_end_index must be the last layer), so the GGUF would compute another model. Save the "
                      f"merged model with save_pretrained_merged instead. Nothing was written.")
