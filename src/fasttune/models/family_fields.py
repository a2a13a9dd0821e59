"""The family-specific parts of ModelConfig.from_hf (models/config.py): each reads one family's transformers config
fields (`get(name, default)`) into a ModelConfig `cfg` in place — Qwen3.5's gated DeltaNet layers, LFM2 / LFM3's
short convolutions, Granite 4.0's Mamba-2 layers, multi-head latent attention (GLM-4.7-Flash, DeepSeek-V2 / V3),
Gemma 4, Ministral 3's query scaling and the mixture-of-experts fields of every MoE family. Each raises
ModelLoadError for settings the decoder cannot run, naming the config field.
"""
from __future__ import annotations

import math

from fasttune.errors import ModelLoadError


def qwen3_5_fields(cfg, get) -> None:
    """Qwen3.5 (transformers' Qwen3_5TextConfig): gated DeltaNet layers where layer_types says "linear_attention"
    (absent: every full_attention_interval-th layer is softmax attention), gated softmax attention with per-head q/k
    norms, (1 + w) RMSNorms, and Qwen3-VL's interleaved multimodal RoPE on a partial rotary dimension (plain RoPE
    for text, whose three position axes are equal). Raises ModelLoadError for a layer type it does not know."""
    types = get("layer_types")
    if not types:
        interval = int(get("full_attention_interval", 4) or 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(cfg.num_layers)]
    unknown = sorted(set(types) - {"linear_attention", "full_attention"})
    if unknown or len(types) < cfg.num_layers:
        raise ModelLoadError(f"layer_types in the Qwen3.5 config must name 'linear_attention' or 'full_attention' for "
                             f"each of the {cfg.num_layers} layers; it has {list(types)}. Fix config.json.")
    cfg.linear_layers = [t == "linear_attention" for t in types[:cfg.num_layers]]
    cfg.linear_key_heads, cfg.linear_value_heads = get("linear_num_key_heads"), get("linear_num_value_heads")
    cfg.linear_key_dim, cfg.linear_value_dim = get("linear_key_head_dim"), get("linear_value_head_dim")
    cfg.linear_conv_kernel = int(get("linear_conv_kernel_dim", 4))
    if cfg.linear_value_heads % cfg.linear_key_heads:
        raise ModelLoadError(f"linear_num_value_heads ({cfg.linear_value_heads}) must be a multiple of "
                             f"linear_num_key_heads ({cfg.linear_key_heads}) in the Qwen3.5 config.")
    cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
    cfg.qk_norm = cfg.attn_output_gate = cfg.mrope_interleaved = True
    cfg.norm_offset = 1.0
    given = (get("rope_parameters") or {}).get("mrope_section")
    # without one, transformers' default sections, where they fit (text alone never needs them: its axes are equal)
    cfg.mrope_section = list(given) if given else [11, 11, 10] if cfg.rotary_dim == 64 else None
    if given and sum(cfg.mrope_section) * 2 != cfg.rotary_dim:
        raise ModelLoadError(f"mrope_section {cfg.mrope_section} does not cover the rotary dimension {cfg.rotary_dim} "
                             f"(its sum must be half of it); the config is inconsistent.")


def lfm2_fields(cfg, get) -> None:
    """LFM2 (transformers' Lfm2Config): short-convolution layers where layer_types says "conv" (absent: all layers
    but those in full_attn_idxs), attention layers with per-head q/k norms, norm_eps, and the MLP width Lfm2MLP
    derives from intermediate_size (block_ff_dim in the original config.json) when block_auto_adjust_ff_dim:
    2/3 of it, times block_ffn_dim_multiplier, rounded up to block_multiple_of. LFM3 (Lfm3Config) adds sliding-window
    attention layers, four norms per layer and a gate per attention head, and takes intermediate_size as it is.
    Raises ModelLoadError for a layer type it does not know."""
    layers, lfm3 = cfg.num_layers, cfg.model_type == "lfm3"
    types = get("layer_types")
    if not types and lfm3:  # Lfm3Config's default pattern
        types = ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
                 for i in range(layers)]
    elif not types:
        full = get("full_attn_idxs")
        full = set(range(layers) if full is None else full)
        types = ["full_attention" if i in full else "conv" for i in range(layers)]
    allowed = {"conv", "full_attention"} | ({"sliding_attention"} if lfm3 else set())
    unknown = sorted(set(types) - allowed)
    if unknown or len(types) < layers:
        raise ModelLoadError(f"layer_types in the {'LFM3' if lfm3 else 'LFM2'} config must name one of "
                             f"{sorted(allowed)} for each of the {layers} layers; it has {list(types)}. Fix "
                             f"config.json.")
    cfg.linear_layers = [t == "conv" for t in types[:layers]]
    cfg.linear_kind = "short_conv"
    cfg.linear_conv_kernel = int(get("conv_L_cache", 7 if lfm3 else 3))
    cfg.conv_bias = bool(get("conv_bias", False))
    cfg.qk_norm = True
    cfg.rms_norm_eps = float(get("norm_eps", 1e-5))
    if get("tie_embedding") is not None:  # the original config.json's name, which Lfm2Config reads
        cfg.tie_embeddings = bool(get("tie_embedding"))
    if cfg.model_type == "lfm2_moe":  # Lfm2MoeMLP takes intermediate_size as it is
        return
    if lfm3:  # LFM3: Gemma 2's four norms (post_operator_norm, post_ffn_norm), a sigmoid gate per attention head,
        cfg.sandwich_norm = bool(get("use_sandwich_norm", True))  # the MLP at intermediate_size as given
        cfg.attn_head_gate = bool(get("use_attention_gate", True))
        cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
        return
    width = get("block_ff_dim") or cfg.intermediate_size
    if get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier, multiple = get("block_ffn_dim_multiplier", 1.0), int(get("block_multiple_of", 256))
        if multiplier is not None:
            width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
    cfg.intermediate_size = width


def granite_hybrid_fields(cfg, get) -> None:
    """Granite 4.0 (transformers' GraniteMoeHybridConfig): Mamba-2 mixers (models/mamba2.py) where layer_types says
    "mamba" ("linear_attention" in transformers 5; absent: every layer), attention elsewhere, with RoPE only when
    position_embedding_type is "rope" (Granite 4.0-H: none); the MLP is shared_mlp, shared_intermediate_size wide,
    gate and up fused, with num_local_experts experts (intermediate_size wide, top-k softmax routing) beside it.
    Raises ModelLoadError for a layer type it does not know or Mamba sizes that do not fit."""
    layers = cfg.num_layers
    types = get("layer_types") or get("layers_block_type") or ["mamba"] * layers
    kinds = {"mamba": True, "linear_attention": True, "attention": False, "full_attention": False}
    if len(types) < layers or set(types) - set(kinds):
        raise ModelLoadError(f"layer_types in the Granite 4.0 config must name 'mamba' or 'attention' for each of the "
                             f"{layers} layers; it has {list(types)}. Fix config.json.")
    cfg.linear_layers = [kinds[t] for t in types[:layers]]
    _mamba_sizes(cfg, get, "Granite 4.0")
    cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
    if get("position_embedding_type") != "rope":
        cfg.rope_layers = [False] * layers
    experts = int(get("num_local_experts", 0) or 0)
    if experts:  # Granite 4.0-H Tiny / Small: top-k softmax routing (renormalised) beside the shared MLP
        cfg.num_experts, cfg.num_experts_per_tok = experts, int(get("num_experts_per_tok", 2))
        cfg.moe_intermediate_size = cfg.intermediate_size
        cfg.moe_layers = [True] * layers
        cfg.norm_topk_prob = cfg.shared_mlp_beside = True
    cfg.intermediate_size = int(get("shared_intermediate_size", 1024))
    cfg.fused_gate_up = True


def _mamba_sizes(cfg, get, family: str, width_key: str = "mamba_expand", bias_key: str = "mamba_proj_bias") -> None:
    """The Mamba-2 fields of Granite 4.0's, Bamba's and Falcon-H1's configs (mamba_*: heads, head size or "auto" =
    width / heads, groups, state, conv, biases, time_step_limit). The width is mamba_expand x hidden_size, or with
    width_key "mamba_d_ssm" (Falcon-H1) that field where set; bias_key names the in_proj / out_proj bias switch.
    Raises ModelLoadError for sizes that do not fit."""
    cfg.linear_kind = "mamba2"
    inner = int(get("mamba_d_ssm") or 0) if width_key == "mamba_d_ssm" else 0
    inner = inner or int(float(get("mamba_expand", 2)) * cfg.hidden_size)
    cfg.mamba_heads = int(get("mamba_n_heads", 128))
    head_dim = get("mamba_d_head", "auto")
    cfg.mamba_head_dim = inner // cfg.mamba_heads if head_dim in (None, "auto") else int(head_dim)
    cfg.mamba_groups, cfg.mamba_state = int(get("mamba_n_groups", 1)), int(get("mamba_d_state", 256))
    if cfg.mamba_heads * cfg.mamba_head_dim != inner or cfg.mamba_heads % cfg.mamba_groups:
        raise ModelLoadError(f"The {family} config's Mamba sizes do not fit: mamba_n_heads ({cfg.mamba_heads}) x "
                             f"mamba_d_head ({cfg.mamba_head_dim}) must be the Mamba width ({width_key}: {inner}), "
                             f"and mamba_n_groups ({cfg.mamba_groups}) must divide mamba_n_heads. Fix config.json.")
    cfg.linear_conv_kernel = int(get("mamba_d_conv", 4))
    cfg.conv_bias = bool(get("mamba_conv_bias", True))
    cfg.mamba_proj_bias = bool(get(bias_key, False))
    cfg.time_step_limit = _time_step_limit(get)


def bamba_fields(cfg, get) -> None:
    """Bamba (transformers' BambaConfig: IBM's Bamba-9B): Granite 4.0's Mamba-2 layers except at attn_layer_indices,
    where attention rotates half of each head (BambaConfig fixes partial_rotary_factor at 0.5); a Llama MLP named
    feed_forward, norms input_layernorm / pre_ff_layernorm / final_layernorm. Raises ModelLoadError for a z-loss
    (z_loss_coefficient > 0: our loss has no such term) or Mamba sizes that do not fit."""
    if float(get("z_loss_coefficient", 0.0) or 0.0) > 0:
        raise ModelLoadError(f"This Bamba config trains with a z-loss (z_loss_coefficient={get('z_loss_coefficient')}),"
                             f" which fasttune's loss does not add. Set it to 0 in config.json, or load the model with "
                             f"fast=False (transformers computes it).")
    attention = set(get("attn_layer_indices") or ())
    cfg.linear_layers = [i not in attention for i in range(cfg.num_layers)]
    _mamba_sizes(cfg, get, "Bamba")
    cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
    cfg.mlp_bias = bool(get("mlp_bias", False))
    cfg.partial_rotary_factor = 0.5


def falcon_h1_fields(cfg, get) -> None:
    """Falcon-H1 (transformers' FalconH1Config): every layer attention and a Mamba-2 mixer side by side on one
    input_layernorm output, then a Llama MLP (feed_forward, pre_ff_layernorm); the µP multipliers (ModelConfig's
    parallel_* fields; key_multiplier folded into the attention scale, lm_head_multiplier into logits_scaling);
    mamba_d_ssm channels wide (else mamba_expand x hidden). Raises ModelLoadError for Mamba sizes that do not fit."""
    cfg.parallel_mamba = True
    cfg.linear_layers = [True] * cfg.num_layers  # (every layer has a Mamba mixer: its caches and padding masks)
    _mamba_sizes(cfg, get, "Falcon-H1", width_key="mamba_d_ssm", bias_key="projectors_bias")
    cfg.mamba_rms_norm = bool(get("mamba_rms_norm", False))
    cfg.mamba_norm_before_gate = bool(get("mamba_norm_before_gate", True))
    cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
    cfg.mlp_bias = bool(get("mlp_bias", False))
    one = lambda k: float(get(k, 1.0) if get(k, 1.0) is not None else 1.0)  # noqa: E731
    cfg.parallel_multipliers = (one("attention_in_multiplier"), one("attention_out_multiplier"),
                                one("ssm_in_multiplier"), one("ssm_out_multiplier"))
    cfg.ssm_multipliers = tuple(float(v) for v in (get("ssm_multipliers") or (1.0,) * 5))
    cfg.mlp_multipliers = tuple(float(v) for v in (get("mlp_multipliers") or (1.0, 1.0)))
    cfg.embedding_multiplier, cfg.embedding_multiplier_ids_only = one("embedding_multiplier"), True
    cfg.logits_scaling = 1.0 / one("lm_head_multiplier")
    cfg.attn_scale = cfg.head_dim ** -0.5 * one("key_multiplier")


def _json_float(v) -> float:
    """A number from a config: a plain one, or a non-finite float as transformers 5 writes it into config.json
    ({"__float__": "Infinity"}), when the file is read as JSON."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _time_step_limit(get) -> tuple[float, float]:
    """The Mamba-2 scan's (min, max) step clamp, transformers' time_step_limit (None: no clamp)."""
    limit = get("time_step_limit", (0.0, float("inf")))
    return (_json_float(limit[0]), _json_float(limit[1])) if limit else (0.0, float("inf"))


# Nemotron-H's layer kinds: transformers 5's layers_block_type names, the original config's names and the letters of
# its hybrid_override_pattern
NEMOTRON_H_KINDS = {"linear_attention": "mamba", "mamba": "mamba", "M": "mamba", "full_attention": "attention",
                    "attention": "attention", "*": "attention", "mlp": "mlp", "-": "mlp", "moe": "moe", "E": "moe"}


def nemotron_h_kinds(get) -> list[str]:
    """Nemotron-H's per-layer kinds ("mamba", "attention", "mlp", "moe") from layers_block_type (or the original
    config.json's hybrid_override_pattern, one letter a layer: M, *, -, E). Raises ModelLoadError for a kind it does
    not know."""
    given = get("layers_block_type") or list(get("hybrid_override_pattern") or "")
    unknown = sorted({str(k) for k in given} - set(NEMOTRON_H_KINDS))
    if unknown or not given:
        raise ModelLoadError(f"layers_block_type / hybrid_override_pattern in the Nemotron-H config must name a kind "
                             f"per layer (mamba / attention / mlp / moe, or M * - E); it has {list(given)}. Fix "
                             f"config.json.")
    return [NEMOTRON_H_KINDS[k] for k in given]


def nemotron_h_fields(cfg, get) -> None:
    """Nemotron-H (transformers' NemotronHConfig: NVIDIA Nemotron-H, Nemotron Nano 2, Nemotron 3): every layer one
    RMSNorm and one mixer (layer_kinds): Mamba-2 (models/mamba2.py; mamba_num_heads x mamba_head_dim wide, n_groups,
    no expand), attention without RoPE, an ungated ReLU² MLP, or (Nemotron 3) ungated ReLU² experts routed as
    DeepSeek-V3's (sigmoid scores + e_score_correction_bias, groups, routed_scaling_factor) beside shared experts;
    RMSNorms scale in fp32 (NemotronHRMSNorm). Raises ModelLoadError for a kind it does not know or a layer count the
    kinds do not cover."""
    kinds = nemotron_h_kinds(get)
    if len(kinds) != cfg.num_layers:
        raise ModelLoadError(f"The Nemotron-H config names {len(kinds)} layer kinds for {cfg.num_layers} layers "
                             f"(num_hidden_layers); fix config.json.")
    cfg.layer_kinds = kinds
    cfg.linear_layers = [k == "mamba" for k in kinds]
    cfg.linear_kind = "mamba2"
    cfg.mamba_heads, cfg.mamba_head_dim = int(get("mamba_num_heads", 128)), int(get("mamba_head_dim", 64))
    cfg.mamba_groups, cfg.mamba_state = int(get("n_groups", 8)), int(get("ssm_state_size", 128))
    if cfg.mamba_heads % cfg.mamba_groups:
        raise ModelLoadError(f"n_groups ({cfg.mamba_groups}) must divide mamba_num_heads ({cfg.mamba_heads}) in the "
                             f"Nemotron-H config.")
    cfg.linear_conv_kernel = int(get("conv_kernel", 4))
    cfg.conv_bias = bool(get("use_conv_bias", True))
    cfg.mamba_proj_bias = bool(get("use_bias", False))
    cfg.time_step_limit = _time_step_limit(get)
    cfg.rms_norm_eps = float(get("layer_norm_epsilon", 1e-5))
    cfg.rope_layers = [False] * cfg.num_layers
    cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
    cfg.mlp_bias = bool(get("mlp_bias", False))
    cfg.mlp_gated = False
    cfg.norm_scale_fp32 = True
    if "moe" in kinds:  # Nemotron 3: ungated ReLU² experts routed as DeepSeek-V3's, shared experts beside them
        cfg.moe_layers = [k == "moe" for k in kinds]
        cfg.num_experts, cfg.num_experts_per_tok = int(get("n_routed_experts")), int(get("num_experts_per_tok"))
        cfg.moe_intermediate_size = int(get("moe_intermediate_size"))
        shared = int(get("n_shared_experts", 1) or 0)
        cfg.shared_expert_size = int(get("moe_shared_expert_intermediate_size")) if shared else 0
        cfg.shared_expert_gated = cfg.experts_gated = False
        cfg.router_scoring, cfg.score_bias = "sigmoid", "router"
        cfg.routed_scaling = float(get("routed_scaling_factor", 1.0))
        cfg.norm_topk_prob = bool(get("norm_topk_prob", True))
        cfg.router_groups = (int(get("n_group", 1) or 1), int(get("topk_group", 1) or 1))
        latent = get("moe_latent_size")
        cfg.moe_latent_size = int(latent) if latent is not None else None


def mla_fields(cfg, get) -> None:
    """Multi-head latent attention (transformers' Glm4MoeLiteAttention, DeepseekV3Attention): head_dim is the rotated
    part (qk_rope_head_dim: transformers maps head_dim to it), interleaved pairs unless rope_interleave is False, and
    the score scale qk_head_dim ** -0.5 times yarn's mscale(factor, mscale_all_dim) squared (yarn_apply_mscale).
    Raises ModelLoadError for a config without the latent sizes."""
    rank, nope = get("kv_lora_rank"), get("qk_nope_head_dim")
    cfg.head_dim = get("qk_rope_head_dim") or cfg.head_dim
    if not rank or not nope or not get("v_head_dim"):
        raise ModelLoadError("The multi-head latent attention config needs kv_lora_rank, qk_nope_head_dim and "
                             "v_head_dim (all > 0); fix config.json.")
    cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim = int(rank), int(nope), int(get("v_head_dim"))
    cfg.q_lora_rank = int(get("q_lora_rank") or 0)
    cfg.num_kv_heads = cfg.num_heads  # every head gets its own key and value from the latent
    cfg.rope_interleaved = bool(get("rope_interleave", True))
    cfg.partial_rotary_factor = 1.0
    cfg.attn_bias = bool(get("attention_bias", False))  # on q_a_proj and kv_a_proj_with_mqa (and o_proj)
    cfg.o_bias = cfg.attn_bias
    from fasttune.kernels.rope import yarn_mscale

    scale = (cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
    params = cfg.rope_scaling or {}
    if params.get("mscale_all_dim"):
        scale *= yarn_mscale(float(params.get("factor", 1.0)), float(params["mscale_all_dim"])) ** 2
    cfg.attn_scale = scale


def gemma4_unsupported(get) -> list[str]:
    """The Gemma 4 features of a config that fasttune's decoder does not run, by their config names (empty: none)."""
    found = []
    if get("use_bidirectional_attention") not in (None, "vision"):  # ("vision": image tokens only, models/vision.py)
        found.append(f"bidirectional attention (use_bidirectional_attention={get('use_bidirectional_attention')!r})")
    return found


def gemma4_fields(cfg, get) -> None:
    """Gemma 4's text model (transformers' Gemma4TextConfig / Gemma4TextDecoderLayer): Gemma 3's four norms, per-head
    q/k norms, sliding and full layers and sqrt(hidden) embedding scale, but RMSNorms that scale by w (not 1 + w), no
    score scale (1.0), an unscaled RMSNorm on the values, a layer_scalar per layer, and full-attention layers with
    their own head size (global_head_dim), key/value heads (num_global_key_value_heads, with attention_k_eq_v) and
    proportional RoPE. Raises ModelLoadError for the features the decoder lacks (gemma4_unsupported)."""
    missing = gemma4_unsupported(get)
    if missing:
        raise ModelLoadError(f"This Gemma 4 config uses {', '.join(missing)}, which fasttune's decoder does not run "
                             f"yet; FastLanguageModel.from_pretrained runs such models through transformers+PEFT.")
    cfg.norm_offset = 0.0
    cfg.embed_scale = math.sqrt(cfg.hidden_size)
    cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
    cfg.qk_norm = cfg.sandwich_norm = cfg.value_norm = cfg.layer_scalar = cfg.norm_scale_fp32 = True
    cfg.image_blocks_sliding_only = True
    cfg.attn_scale = 1.0
    cfg.attn_logit_softcap = None
    cfg.final_logit_softcap = get("final_logit_softcapping")
    # transformers keys the per-layer overrides by layer index as text, zero-padded to the layer count's width ("05"
    # in a 30-layer model)
    per_layer = {int(k): v for k, v in (get("per_layer_config") or {}).items()}
    full = [i for i, t in enumerate(get("layer_types") or []) if t == "full_attention"]
    override = per_layer.get(full[0], {}) if full else {}
    override = override if isinstance(override, dict) else vars(override)
    cfg.global_head_dim = int(override.get("head_dim") or get("global_head_dim") or cfg.head_dim)
    cfg.values_from_keys = bool(get("attention_k_eq_v", False))
    kv = override.get("num_key_value_heads") or (get("num_global_key_value_heads") if cfg.values_from_keys else None)
    cfg.global_kv_heads = int(kv or cfg.num_kv_heads)
    cfg.kv_shared_layers = int(get("num_kv_shared_layers") or 0)
    cfg.double_wide_mlp = bool(get("use_double_wide_mlp", False)) and cfg.kv_shared_layers > 0
    cfg.per_layer_input_size = int(get("hidden_size_per_layer_input") or 0)
    cfg.per_layer_vocab_size = int(get("vocab_size_per_layer_input") or cfg.vocab_size)
    if get("enable_moe_block"):  # 26B-A4B: routed experts beside every layer's dense MLP (models/gemma4.py)
        sizes = [get("num_experts"), get("top_k_experts"), get("moe_intermediate_size")]
        if not all(sizes):
            raise ModelLoadError("The Gemma 4 config enables the mixture-of-experts block but lacks num_experts, "
                                 "top_k_experts or moe_intermediate_size; fix config.json.")
        cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size = (int(v) for v in sizes)
        cfg.moe_block = "gemma4"
    if not 0 <= cfg.kv_shared_layers < cfg.num_layers:
        raise ModelLoadError(f"num_kv_shared_layers ({cfg.kv_shared_layers}) must be below num_hidden_layers "
                             f"({cfg.num_layers}) in the Gemma 4 config: some layer has to compute keys and values.")


def llama4_query_scale(get) -> tuple | None:
    """(beta, original_max_position_embeddings) of Ministral 3's query scaling, from rope_parameters
    (transformers' get_llama_4_attn_scale reads the same two keys), or None when the config has no beta."""
    params = get("rope_parameters") or get("rope_scaling") or {}
    beta = params.get("llama_4_scaling_beta")
    if beta is None:
        return None
    original = params.get("original_max_position_embeddings") or get("max_position_embeddings")
    return float(beta), int(original)


def moe_fields(cfg, get) -> None:
    """Experts, top-k, normalisation and MoE layers as transformers' Qwen3MoeDecoderLayer / MixtralDecoderLayer
    choose them: Qwen3-MoE layer i is sparse unless i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0."""
    if cfg.model_type == "gpt_oss":  # every layer sparse (transformers' GptOssDecoderLayer)
        cfg.num_experts = get("num_local_experts")
        cfg.moe_intermediate_size = cfg.intermediate_size
        cfg.moe_layers = [True] * cfg.num_layers
        cfg.moe_block = "gpt_oss"
        cfg.swiglu_limit = float(get("swiglu_limit", 7.0))
        cfg.swiglu_alpha = float(get("swiglu_alpha", 1.702))
    elif cfg.model_type == "qwen3_5_moe_text":  # every layer sparse, renormalised top-k, one shared expert
        cfg.num_experts = get("num_experts")
        cfg.moe_intermediate_size = get("moe_intermediate_size")
        cfg.shared_expert_size = int(get("shared_expert_intermediate_size") or 0)
        cfg.norm_topk_prob = True  # transformers' Qwen3_5MoeTopKRouter always renormalises
        cfg.moe_layers = [True] * cfg.num_layers
    elif cfg.model_type == "qwen3_next":  # Qwen3.5-MoE's block (shared expert) where Qwen3-MoE's rule puts experts
        cfg.num_experts = get("num_experts")
        cfg.moe_intermediate_size = get("moe_intermediate_size")
        cfg.shared_expert_size = int(get("shared_expert_intermediate_size") or 0)
        cfg.norm_topk_prob = bool(get("norm_topk_prob", True))
        step, dense = get("decoder_sparse_step", 1) or 1, set(get("mlp_only_layers") or [])
        cfg.moe_layers = [i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0
                          for i in range(cfg.num_layers)]
    elif cfg.model_type in ("glm4_moe", "glm4_moe_lite", "deepseek_v3", "deepseek_v2", "mistral4"):  # dense first
        cfg.num_experts = get("n_routed_experts") or get("num_local_experts")
        cfg.moe_intermediate_size = get("moe_intermediate_size")
        cfg.shared_expert_size = cfg.moe_intermediate_size * int(get("n_shared_experts", 1) or 0)
        cfg.shared_expert_gated = False
        cfg.norm_topk_prob = bool(get("norm_topk_prob", True))
        cfg.router_scoring, cfg.routed_scaling = "sigmoid", float(get("routed_scaling_factor", 1.0))
        cfg.router_groups = (int(get("n_group", 1) or 1), int(get("topk_group", 1) or 1))
        if cfg.num_experts % cfg.router_groups[0] or not 0 < cfg.router_groups[1] <= cfg.router_groups[0]:
            raise ModelLoadError(f"n_group {cfg.router_groups[0]} / topk_group {cfg.router_groups[1]} in the GLM-4.5 "
                                 f"config do not fit its {cfg.num_experts} experts (n_group must divide them, and "
                                 f"1 <= topk_group <= n_group). Fix config.json.")
        first = int(get("first_k_dense_replace", 1) or 0)
        kinds = get("mlp_layer_types")  # GLM-4.7-Flash: "dense" / "sparse" per layer
        if kinds and (len(kinds) < cfg.num_layers or set(kinds) - {"dense", "sparse"}):
            raise ModelLoadError(f"mlp_layer_types in the model config must name 'dense' or 'sparse' for each of the "
                                 f"{cfg.num_layers} layers; it has {list(kinds)}. Fix config.json.")
        cfg.moe_layers = [kinds[i] == "sparse" for i in range(cfg.num_layers)] if kinds else \
            [i >= first for i in range(cfg.num_layers)]
        if cfg.model_type == "deepseek_v2":  # transformers' DeepseekV2TopkRouter: softmax, greedy or by groups (each
            # group's best score), never renormalised, times routed_scaling_factor
            cfg.router_scoring, cfg.norm_topk_prob = "softmax_grouped", False
            if get("topk_method", "greedy") != "group_limited_greedy":
                cfg.router_groups = (1, 1)
        if cfg.model_type == "mistral4":  # transformers' Mistral4TopkRouter: DeepSeek-V3's rule over softmax scores
            cfg.router_scoring = "softmax_pairs"
    elif cfg.model_type == "lfm2_moe":  # transformers' Lfm2MoeSparseMoeBlock / Lfm2MoeTopKRouter: sigmoid scores in
        # the model's dtype, chosen by score + the block's expert_bias, renormalised (+ 1e-6), scaled; dense layers first
        cfg.num_experts = get("num_experts")
        cfg.moe_intermediate_size = get("moe_intermediate_size")
        cfg.norm_topk_prob = bool(get("norm_topk_prob", True))
        cfg.router_scoring, cfg.routed_scaling = "sigmoid", float(get("routed_scaling_factor", 1.0))
        cfg.router_renorm_eps, cfg.score_bias = 1e-6, "block" if get("use_expert_bias", True) else None
        dense = int(get("num_dense_layers", 0) or 0)
        cfg.moe_layers = [i >= dense for i in range(cfg.num_layers)]
    elif cfg.model_type == "ernie4_5_moe":  # transformers' Ernie4_5_MoeDecoderLayer / Ernie4_5_MoeTopKRouter: sparse
        # where (i + 1) % moe_layer_interval == 0 within [start, end]; fp32 softmax, experts chosen by probability +
        # e_score_correction_bias, weighted by their probabilities over max(their sum, moe_norm_min); shared experts
        cfg.num_experts = get("moe_num_experts") or get("num_experts")
        cfg.moe_intermediate_size = get("moe_intermediate_size")
        cfg.shared_expert_size = cfg.moe_intermediate_size * int(get("moe_num_shared_experts", 0) or 0)
        cfg.shared_expert_gated = False
        cfg.router_scoring, cfg.norm_topk_prob = "softmax_bias", True
        cfg.router_renorm_eps = float(get("moe_norm_min", 1e-12) or 1e-12)
        start, end = int(get("moe_layer_start_index", 1)), int(get("moe_layer_end_index", -1))
        end = cfg.num_layers - 1 if end == -1 else end
        interval = int(get("moe_layer_interval", 1) or 1)
        cfg.moe_layers = [(i + 1) % interval == 0 and start <= i <= end for i in range(cfg.num_layers)]
    elif cfg.model_type == "mixtral":
        cfg.num_experts = get("num_local_experts")
        cfg.moe_intermediate_size = cfg.intermediate_size
        cfg.norm_topk_prob = True
        cfg.router_jitter = float(get("router_jitter_noise", 0.0) or 0.0)
        cfg.moe_layers = [True] * cfg.num_layers
    else:
        cfg.num_experts = get("num_experts", get("num_local_experts"))
        cfg.moe_intermediate_size = get("moe_intermediate_size")
        # Qwen3-VL-MoE's router always renormalises (transformers' Qwen3VLMoeTextTopKRouter has no switch)
        cfg.norm_topk_prob = cfg.model_type == "qwen3_vl_moe_text" or bool(get("norm_topk_prob", False))
        cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
        cfg.qk_norm = True
        step, dense = get("decoder_sparse_step", 1) or 1, set(get("mlp_only_layers") or [])
        cfg.moe_layers = [i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0
                          for i in range(cfg.num_layers)]
    cfg.num_experts_per_tok = get("num_experts_per_tok") or get("moe_k")  # (ERNIE 4.5's config.json: moe_k)
