"""ModelConfig: everything the one decoder needs, read from a transformers config (4.5x or 5.x layout).

Family quirks are fields, not subclasses (DESIGN.md): `norm_offset` for Gemma's (1 + w) RMSNorm, `qk_norm` for
Qwen3, `attn_logit_softcap`/`final_logit_softcap` and the four-norm block for Gemma 2, `embed_scale` for Gemma,
`fused_qkv`/`fused_gate_up` for Phi-3, per-layer `sliding_window` from `layer_types`, and Gemma 3's second RoPE
base for its sliding-window layers (`rope_local_theta`), the sparse MoE MLP of Qwen3-MoE and Mixtral
(`num_experts` > 0, which layers are MoE in `moe_layers`; see models/moe.py), and gpt-oss's attention sinks
(`attn_sinks`) and its MoE block with biases and a clamped SwiGLU (`moe_block = "gpt_oss"`, models/gpt_oss.py),
SmolLM3's and EXAONE 4's layers without RoPE (`rope_layers`), OLMo 2/3's and EXAONE 4's post-norm layers and
OLMo's whole-projection q/k norms (`post_norm`, `qk_norm_full`), Ernie 4.5's and GLM-4's adjacent-pair RoPE
(`rope_interleaved`), Granite's multipliers (`embedding_multiplier`, `residual_multiplier`, `logits_scaling`,
with `attn_scale` its attention_multiplier), Hunyuan's q/k norms after RoPE (`qk_norm_after_rope`), and the ungated MLP
(`mlp_gated`) of Arcee (ReLU²) and Apertus (xIELU); Seed-OSS is Llama's layers with q/k/v biases apart from o_proj's
(`attention_out_bias`); Cohere's (Command R, Aya) and Cohere 2's layers run attention and MLP side by side on one
LayerNorm (`parallel_block`, `centered_norm`), with RoPE on adjacent pairs (Cohere 2: in the sliding layers only)
and the logits times logit_scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from fasttune.errors import ModelLoadError
from fasttune.models.family_fields import (bamba_fields, falcon_h1_fields, gemma4_fields, gemma4_unsupported,
                                           granite_hybrid_fields, lfm2_fields,
                                           llama4_query_scale, mla_fields, moe_fields, nemotron_h_fields,
                                           nemotron_h_kinds, qwen3_5_fields)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3",
                      "olmo2", "olmo3", "granite", "ministral", "ministral3", "exaone4", "ernie4_5", "glm4",
                      "hunyuan_v1_dense", "arcee", "apertus", "qwen3_moe", "mixtral",
                      "gpt_oss", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "lfm2", "lfm3", "glm4_moe",
                      "glm4_moe_lite", "deepseek_v3", "deepseek_v2", "gemma4_text", "mistral4", "lfm2_moe",
                      "seed_oss", "cohere2", "cohere", "granitemoehybrid", "ernie4_5_moe", "nemotron_h", "bamba",
                      "falcon_h1")
# Language models of vision-language checkpoints (models/vision.py): built from the VLM's text_config (Qwen3.5's,
# "qwen3_5_text", is also a text checkpoint's model_type, so it is in SUPPORTED_FAMILIES).
VISION_TEXT_FAMILIES = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text")
# Language models with cross-attention layers over the image features (Llama 3.2 Vision's, transformers'
# MllamaTextModel): Llama's self-attention layers with the cross-attention layers of models/cross_attention.py
CROSS_ATTENTION_FAMILIES = ("mllama_text_model",)
MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "qwen3_vl_moe_text", "qwen3_5_moe_text", "qwen3_next", "glm4_moe",
                "glm4_moe_lite", "deepseek_v3", "deepseek_v2", "mistral4", "lfm2_moe", "ernie4_5_moe")
# a config without rope_theta: the family's default_theta in transformers
DEFAULT_THETAS = {"lfm2": 1000000.0, "lfm2_moe": 1000000.0, "ernie4_5_moe": 500000.0}
# Module names where a family departs from Llama's, as transformers names them (so checkpoints load and PEFT
# adapters carry the same keys): LFM2 calls the attention output out_proj and its q/k norms q_layernorm /
# k_layernorm, the MLP feed_forward with w1 / w3 / w2 for gate / up / down, and the final norm embedding_norm.
RENAMED = {"lfm2": {"o_proj": "out_proj", "q_norm": "q_layernorm", "k_norm": "k_layernorm", "mlp": "feed_forward",
                    "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "norm": "embedding_norm"},
           "lfm3": {"mlp": "feed_forward", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2",
                    "norm": "embedding_norm"},
           "glm4_moe": {"shared_expert": "shared_experts"}, "glm4_moe_lite": {"shared_expert": "shared_experts"},
           "deepseek_v3": {"shared_expert": "shared_experts"}, "deepseek_v2": {"shared_expert": "shared_experts"},
           "mistral4": {"shared_expert": "shared_experts"}, "ernie4_5_moe": {"shared_expert": "shared_experts"},
           "nemotron_h": {"shared_expert": "shared_experts"}}
# Granite 4.0 (GraniteMoeHybrid): the dense MLP is shared_mlp, its fused gate|up input_linear, its down output_linear
# (and in Granite 4.0-H Tiny / Small the experts' block is block_sparse_moe, its router `router`: ModelConfig.moe_name)
RENAMED["granitemoehybrid"] = {"mlp": "shared_mlp", "gate_up_proj": "input_linear", "gate_proj": "input_linear",
                               "up_proj": "input_linear", "down_proj": "output_linear", "gate": "router"}
# Bamba: Granite 4.0's Mamba layers with a Llama MLP named feed_forward and a final_layernorm (Falcon-H1 too)
RENAMED["bamba"] = {"mlp": "feed_forward", "norm": "final_layernorm"}
RENAMED["falcon_h1"] = RENAMED["bamba"]
RENAMED["lfm2_moe"] = RENAMED["lfm2"]  # LFM2's layers with MoE feed-forwards (its gate, experts, expert_bias)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu", "relu2", "xielu")
# families whose MLP is down(act(up(x))), and that activation
UNGATED = {"arcee": "relu2", "apertus": "xielu", "nemotron_h": "relu2"}


@dataclass
class ModelConfig:
    """The one decoder's view of a checkpoint's architecture: sizes, RoPE, norms, biases, soft-caps, sliding windows and
    MoE fields, read from the transformers config by `from_hf` (family quirks are fields; see the module docstring)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|"yarn", "factor": ..., ...}
    rope_local_theta: float | None = None  # Gemma 3: sliding-window layers rotate with this base, unscaled
    # Qwen2.5-VL's multimodal RoPE: frequency i of each half rotates with position axis (t, h, w) by section
    mrope_section: list | None = None
    mrope_interleaved: bool = False  # Qwen3-VL: frequencies cycle t, h, w instead of running in sections
    partial_rotary_factor: float = 1.0
    rope_interleaved: bool = False  # Ernie 4.5 (GLM's rotate_half): RoPE pairs channels 2i, 2i + 1 (not i, i + d/2)
    # per layer: False = the layer applies no RoPE (SmolLM3's NoPE layers, transformers' no_rope_layers 0); empty = all
    rope_layers: list = field(default_factory=list)
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    attn_bias: bool = False  # q/k/v bias (qwen2: True; llama: attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    mlp_gated: bool = True  # False: Arcee's down(act(up(x))) with no gate_proj
    qk_norm: bool = False
    qk_norm_full: bool = False  # OLMo 2/3: q/k norms span all heads' channels (one RMSNorm over the projection)
    qk_norm_after_rope: bool = False  # Hunyuan: per-head q/k norms (query_/key_layernorm) on the rotated q and k
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    sandwich_norm: bool = False  # Gemma 2: post-attention and pre/post-feedforward norms
    post_norm: bool = False  # OLMo 2/3: no pre-norms; the attention and MLP outputs are normed before each residual add
    embed_scale: float | None = None  # Gemma: hidden * sqrt(hidden_size)
    # Granite's multipliers (transformers' GraniteConfig): embeddings (given ones too) times embedding_multiplier,
    # each sublayer's output times residual_multiplier before its residual add, logits divided by logits_scaling
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    attn_scale: float | None = None  # None: head_dim ** -0.5
    # Ministral 3 (Llama 4's attention scaling): queries at position p are multiplied by
    # 1 + beta * ln(1 + floor(p / original_max_position_embeddings)), as (beta, original max); 1 below that length
    query_position_scale: tuple | None = None
    attn_logit_softcap: float | None = None
    attn_sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax's denominator
    final_logit_softcap: float | None = None
    sliding_windows: list = field(default_factory=list)  # per layer: window size or None
    tie_embeddings: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    # Sparse MoE (models/moe.py): 0 experts = dense MLPs everywhere
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum 1
    router_jitter: float = 0.0  # Mixtral's router_jitter_noise (training only)
    moe_layers: list = field(default_factory=list)  # per layer: True = sparse MoE MLP
    # Which MoE module: "sparse" (Qwen3-MoE, Mixtral: models/moe.py), "gpt_oss" (router and expert biases,
    # interleaved gate/up, clamped SwiGLU: models/gpt_oss.py) or "gemma4" (routed experts beside every layer's dense
    # MLP, outside moe_layers: models/gemma4.py)
    moe_block: str = "sparse"
    swiglu_limit: float = 7.0  # gpt-oss: gate clamped above, up on both sides, at this value
    swiglu_alpha: float = 1.702  # gpt-oss: glu = gate * sigmoid(alpha * gate)
    # Qwen3.5-MoE: beside the routed experts, a shared expert MLP of this width whose output is scaled by
    # sigmoid(shared_expert_gate(x)); 0 = none
    shared_expert_size: int = 0
    shared_expert_gated: bool = True  # False: GLM-4.5's shared experts, added without Qwen3.5-MoE's sigmoid gate
    # DeepSeek-V3's routing (GLM-4.5, models/moe.py's route_sigmoid): "sigmoid" scores, experts chosen by score +
    # e_score_correction_bias within the best topk_group of n_group groups, weighted by their scores (renormalised
    # when norm_topk_prob) times routed_scaling_factor, the router in fp32; "softmax" is the usual top-k softmax;
    # "softmax_grouped" DeepSeek-V2's (route_softmax_grouped: softmax in fp32, the groups ranked by their best score,
    # weights not renormalised, times routed_scaling_factor); "softmax_pairs" Mistral 4's (route_softmax_pairs:
    # DeepSeek-V3's groups and weights over softmax scores, the router in the model's dtype); "softmax_bias" ERNIE 4.5
    # MoE's (route_softmax_bias: fp32 softmax, experts chosen by probability + bias, renormalised over
    # max(sum, router_renorm_eps))
    router_scoring: str = "softmax"
    router_groups: tuple = (1, 1)  # (n_group, topk_group)
    router_renorm_eps: float = 1e-20  # added to the top-k weights' sum when renormalising (LFM2-MoE: 1e-6)
    # Where the sigmoid routing's score bias lives: "router" (GLM-4.5, DeepSeek-V3: the router's
    # e_score_correction_bias), "block" (LFM2-MoE: the MoE block's expert_bias) or None (no bias)
    score_bias: str | None = "router"
    routed_scaling: float = 1.0
    # Qwen3.5: q_proj also yields a per-channel gate; the attention output is multiplied by sigmoid(gate)
    attn_output_gate: bool = False
    attn_head_gate: bool = False  # LFM3: each head's output times sigmoid(g_proj(x)), g_proj (heads, hidden)
    # Qwen3.5's gated DeltaNet layers (models/gated_deltanet.py): per layer True = linear attention instead of
    # softmax attention (transformers' layer_types "linear_attention"); empty = none
    linear_layers: list = field(default_factory=list)
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv_kernel: int = 4
    # Qwen3-Next: q/k/v/z in one projection (in_proj_qkvz) and b/a in another (in_proj_ba), grouped per key head
    linear_fused_projections: bool = False
    # Which token mixer the linear_layers run: "gated_deltanet" (Qwen3.5, Qwen3-Next: models/gated_deltanet.py) or
    # "short_conv" (LFM2's gated short convolution of linear_conv_kernel taps: models/short_conv.py)
    # "short_conv" (LFM2's gated short convolution of linear_conv_kernel taps: models/short_conv.py) or "mamba2"
    # (Granite 4.0's Mamba-2 mixer: models/mamba2.py)
    linear_kind: str = "gated_deltanet"
    conv_bias: bool = False  # LFM2: biases on the short convolution and its two projections; Mamba-2: on its conv1d
    # Mamba-2 mixers (models/mamba2.py): heads of head_dim channels, B / C shared by groups of heads, d_state, biases
    # on in_proj / out_proj, and the (min, max) clamp of the scan's steps (transformers' time_step_limit)
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 1
    mamba_state: int = 0
    mamba_proj_bias: bool = False
    time_step_limit: tuple = (0.0, float("inf"))
    # Granite 4.0-H Tiny / Small: every layer's experts (block_sparse_moe) are added to a dense MLP beside them
    # (shared_mlp, intermediate_size wide), which transformers' layer holds, not the MoE block
    shared_mlp_beside: bool = False
    # Nemotron-H: each layer is one norm and one mixer (`mixer`: "mamba", "attention", "mlp" or "moe", transformers'
    # NemotronHBlock) instead of attention then MLP; empty = the usual two-sublayer layers
    layer_kinds: list = field(default_factory=list)
    experts_gated: bool = True  # False: Nemotron 3's ungated ReLU² experts (up_proj, down_proj: models/moe.py)
    # Nemotron 3 Super: the routed experts run on a moe_latent_size-wide projection of the hidden state
    # (fc1_latent_proj before them, fc2_latent_proj after; routing and shared experts on the hidden state)
    moe_latent_size: int | None = None
    # Falcon-H1: every layer runs attention and a Mamba-2 mixer side by side on the same normed input (their outputs
    # added), with µP multipliers: (attention in, attention out, ssm in, ssm out), the in_proj output's five
    # sections (z, x, B, C, dt: ssm_multipliers), the MLP's (gate, down); the embedding multiplier applies to looked-up
    # ids only; the Mamba gated norm optional (mamba_rms_norm) and its norm before the gate (mamba_norm_before_gate)
    parallel_mamba: bool = False
    parallel_multipliers: tuple = (1.0, 1.0, 1.0, 1.0)
    ssm_multipliers: tuple | None = None
    mlp_multipliers: tuple | None = None
    mamba_rms_norm: bool = True
    mamba_norm_before_gate: bool = False
    embedding_multiplier_ids_only: bool = False
    # DeepSeek-V2/V3's multi-head latent attention (GLM-4.7-Flash, models/mla.py): keys and values come from a
    # kv_lora_rank-wide latent (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj); each head's query and key are
    # qk_nope_head_dim channels without RoPE then head_dim (qk_rope_head_dim) rotated ones, the rotated key shared
    # by all heads; values v_head_dim wide; queries through a q_lora_rank-wide latent (0: one q_proj). 0 = not MLA
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Gemma 4 (transformers' Gemma4TextAttention): full-attention layers have their own head size and key/value heads
    # (global_head_dim, global_kv_heads; 0 = head_dim, num_kv_heads); with attention_k_eq_v they have no v_proj and
    # take k_proj's output as values (values_from_keys); every layer's values pass an unscaled RMSNorm (value_norm)
    # and each layer's output is multiplied by its layer_scalar buffer (layer_scalar)
    global_head_dim: int = 0
    global_kv_heads: int = 0
    values_from_keys: bool = False
    value_norm: bool = False
    layer_scalar: bool = False
    norm_scale_fp32: bool = False  # Gemma 4: RMSNorms apply w in fp32, then cast (Llama's cast, then scale)
    image_blocks_sliding_only: bool = False  # Gemma 4: an image's tokens see each other in the sliding layers only
    # PaliGemma: a block (its prefix) sees itself past the sliding window too, OR(AND(causal, window), block), as
    # transformers' create_sliding_window_causal_mask composes an or_mask; Gemma 3 / 4 keep the window on their image
    # blocks, AND(window, OR(causal, block)) (their create_masks_for_vision_model)
    blocks_beyond_window: bool = False
    # Gemma 4 E2B / E4B: the last kv_shared_layers layers compute no keys or values: each reuses those of the last
    # earlier layer of its kind (sliding / full), and with double_wide_mlp their MLPs are twice intermediate_size;
    # per-layer embeddings (PLE) of per_layer_input_size channels per layer from a per_layer_vocab_size table
    kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    # Llama 3.2 Vision (models/cross_attention.py): the layers that attend to the image features instead of the
    # text (transformers' cross_attention_layers), and the embedding's rows past vocab_size (its 8 extra rows, the
    # <|image|> token among them; lm_head keeps vocab_size)
    cross_attention_layers: list = field(default_factory=list)
    extra_embeddings: int = 0
    # Cohere 2 (Command R7B, Command A): each layer's attention and MLP read the same normed input and are added to
    # the residual together (parallel_block; one input_layernorm), and its norms are LayerNorms without a bias
    # (centered_norm: the mean is subtracted before the variance, transformers' CohereLayerNorm)
    parallel_block: bool = False
    centered_norm: bool = False

    def kv_source(self, layer_idx: int) -> int | None:
        """The layer whose keys and values layer `layer_idx` reuses (Gemma 4's shared key/value layers: the last
        layer of the same kind, sliding or full, before the shared ones), or None when it computes its own."""
        first = self.num_layers - self.kv_shared_layers
        if not self.kv_shared_layers or layer_idx < first:
            return None
        sliding = self.sliding_windows[layer_idx] is not None
        return max(i for i in range(first) if (self.sliding_windows[i] is not None) == sliding)

    def kv_stored(self, layer_idx: int) -> bool:
        """Whether a later layer reuses layer `layer_idx`'s keys and values (kv_source)."""
        return any(self.kv_source(i) == layer_idx for i in range(self.num_layers - self.kv_shared_layers,
                                                                   self.num_layers))

    def layer_config(self, layer_idx: int) -> "ModelConfig":
        """This config as layer `layer_idx`'s attention sees it: Gemma 4's full-attention layers with their own head
        size and key/value heads; every other layer (and family) gets self."""
        if not (self.global_head_dim or self.global_kv_heads) or self.sliding_windows[layer_idx] is not None:
            return self
        return replace(self, head_dim=self.global_head_dim or self.head_dim,
                       num_kv_heads=self.global_kv_heads or self.num_kv_heads)

    @property
    def global_rotary_dim(self) -> int:
        """How many channels RoPE rotates in the full-attention layers' heads (wider in Gemma 4; else rotary_dim)."""
        return int((self.global_head_dim or self.head_dim) * self.partial_rotary_factor)

    @property
    def max_head_dim(self) -> int:
        """The widest attention head of any layer (Gemma 4's full layers can be wider)."""
        return max(self.head_dim, self.global_head_dim)

    def windows_wider_than(self, head_dim: int) -> set:
        """The sliding windows (None: full attention) of the layers whose heads have more than head_dim channels:
        Gemma 4's full layers (512) against flash attention's 256."""
        if self.max_head_dim <= head_dim:
            return set()
        windows = self.sliding_windows or [None] * self.num_layers
        return {w for i, w in enumerate(windows) if self.layer_config(i).head_dim > head_dim}

    @property
    def moe_name(self) -> str:
        """The MoE block's module name in a layer: the MLP's (`mlp`; LFM2-MoE's `feed_forward`), or Granite 4.0's
        `block_sparse_moe`, whose dense `shared_mlp` sits beside it."""
        if self.layer_kinds:  # (Nemotron-H: the layer's one mixer)
            return "mixer"
        return "block_sparse_moe" if self.shared_mlp_beside else self.module_name("mlp")

    def module_name(self, name: str) -> str:
        """This family's name for the Llama module `name` (RENAMED), e.g. "o_proj" -> "out_proj" in LFM2."""
        return RENAMED.get(self.model_type, {}).get(name, name)

    @property
    def scaling(self) -> float:
        """The attention score scale: attn_scale (Gemma 2/3: query_pre_attn_scalar ** -0.5) or head_dim ** -0.5."""
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    @property
    def value_dim(self) -> int:
        """Channels of each head's value and attention output: v_head_dim (MLA) or head_dim."""
        return self.v_head_dim or self.head_dim

    @property
    def rotary_dim(self) -> int:
        """How many of each head's head_dim channels RoPE rotates: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Build from a transformers PretrainedConfig (or a plain config.json dict). Raises ModelLoadError for a
        family outside SUPPORTED_FAMILIES (and the vision-language text towers), an activation outside ACTIVATIONS,
        a RoPE scaling type outside SUPPORTED_ROPE_TYPES, an mrope_section that does not cover head_dim, or
        Gemma 3's bidirectional (embedding) variant."""
        if not isinstance(hf, dict) and "per_layer_config" in hf.to_diff_dict():
            # a config with per-layer values (Gemma 4's) refuses plain reads of them: read its serialised form
            hf = hf.to_dict()
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        model_type = get("model_type")
        if model_type not in SUPPORTED_FAMILIES + VISION_TEXT_FAMILIES + CROSS_ATTENTION_FAMILIES:
            raise ModelLoadError(
                f"Architecture '{model_type}' is not supported by fasttune's decoder yet (supported: "
                f"{', '.join(SUPPORTED_FAMILIES)}). Load it with FastLanguageModel.from_pretrained, which runs other "
                f"architectures through transformers+PEFT (the fallback), or use a model of a supported family."
            )
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        layers = get("num_hidden_layers")
        if layers is None and model_type == "nemotron_h":  # transformers 5 saves it as the kinds' count only
            layers = len(nemotron_h_kinds(get))
        theta, scaling, partial, local_theta = _rope_fields(get)
        gemma = model_type in ("gemma", "gemma2", "gemma3_text", "gemma4_text")
        act = get("hidden_activation") if gemma else get("mlp_hidden_act", "relu2") if model_type == "nemotron_h" \
            else get("hidden_act", "silu")
        act = act or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS or (act in UNGATED.values()) != (UNGATED.get(model_type) == act):
            raise ModelLoadError(f"Activation '{act}' in the model config is not supported (supported: {ACTIVATIONS}; "
                                 f"relu2 in Arcee's ungated MLP only, xielu in Apertus').")

        cfg = cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            rope_local_theta=local_theta,
            partial_rotary_factor=partial,
            max_position_embeddings=get("max_position_embeddings", 4096),
            hidden_act=act,
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            pad_token_id=get("pad_token_id"),
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
        )
        if model_type in ("llama", "mistral", "ministral3", "smollm3", "olmo2", "olmo3", "granite", "arcee", "apertus",
                          "seed_oss", *CROSS_ATTENTION_FAMILIES):
            cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
            if model_type == "seed_oss":  # Seed-OSS: q/k/v biases and the output projection's own switch
                cfg.o_bias = bool(get("attention_out_bias", False))
            cfg.mlp_bias = bool(get("mlp_bias", False))
            if model_type == "smollm3":
                cfg.rope_layers = _rope_layers(get, layers)
            if model_type == "ministral3":
                cfg.query_position_scale = llama4_query_scale(get)
            if model_type in ("olmo2", "olmo3"):
                cfg.qk_norm = cfg.qk_norm_full = cfg.post_norm = True
            cfg.mlp_gated = model_type not in UNGATED
            if model_type == "apertus":
                cfg.qk_norm = True
            if model_type in CROSS_ATTENTION_FAMILIES:
                cfg.cross_attention_layers = sorted(int(i) for i in get("cross_attention_layers") or ())
                cfg.extra_embeddings = 8  # transformers' MllamaTextModel: nn.Embedding(vocab_size + 8, ...)
            if model_type == "granite":
                granite_multipliers(cfg, get)
        elif model_type == "qwen2":
            cfg.attn_bias = True
        elif model_type in ("cohere", "cohere2"):  # adjacent-pair RoPE; logits times logit_scale
            cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
            cfg.rope_interleaved = cfg.parallel_block = cfg.centered_norm = True
            cfg.rms_norm_eps = float(get("layer_norm_eps", 1e-5))
            cfg.logits_scaling = 1.0 / float(get("logit_scale", 0.0625))
            if model_type == "cohere2":  # RoPE in the sliding layers only
                cfg.rope_layers = [t == "sliding_attention" for t in _layer_types(get, model_type, layers)]
            else:  # Command R+: LayerNorms on q and k, a weight per head (use_qk_norm)
                cfg.qk_norm = bool(get("use_qk_norm", False))
        elif model_type in VISION_TEXT_FAMILIES:
            if model_type in ("qwen3_vl_text", "qwen3_vl_moe_text"):
                cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
                cfg.qk_norm = cfg.mrope_interleaved = True
            else:
                cfg.attn_bias = True
            cfg.mrope_section = list((get("rope_parameters") or {}).get("mrope_section")
                                     or (get("rope_scaling") or {}).get("mrope_section") or [16, 24, 24])
            if sum(cfg.mrope_section) * 2 != cfg.rotary_dim:
                raise ModelLoadError(f"mrope_section {cfg.mrope_section} does not cover head_dim {head_dim} (its sum "
                                     f"must be head_dim / 2); the config is inconsistent.")
        elif model_type == "qwen3":
            cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
            cfg.qk_norm = True
        elif model_type == "glm4":  # Phi-3's fused gate_up, Gemma 2's four norms, adjacent-pair partial RoPE
            cfg.attn_bias = bool(get("attention_bias", True))
            cfg.fused_gate_up = cfg.sandwich_norm = cfg.rope_interleaved = True
        elif model_type == "glm4_moe":  # DeepSeek-V3's layers with Llama's attention: q/k/v biases, half RoPE
            cfg.attn_bias = bool(get("attention_bias", False))
            cfg.qk_norm = bool(get("use_qk_norm", False))
            if get("partial_rotary_factor") is None and "partial_rotary_factor" not in (get("rope_parameters") or {}):
                cfg.partial_rotary_factor = 0.5  # Glm4MoeConfig's default
        elif model_type == "hunyuan_v1_dense":
            cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
            cfg.qk_norm = cfg.qk_norm_after_rope = True
        elif model_type in ("ernie4_5", "ernie4_5_moe"):
            cfg.attn_bias = cfg.o_bias = cfg.mlp_bias = bool(get("use_bias", False))
            cfg.rope_interleaved = True
        elif model_type == "exaone4":  # OLMo 2's post-norm layers, per-head q/k norms; with a sliding window,
            cfg.qk_norm = cfg.post_norm = True  # only the sliding layers rotate (transformers' Exaone4Attention)
            if get("sliding_window") is not None:
                cfg.rope_layers = [t == "sliding_attention" for t in _layer_types(get, model_type, layers)]
        elif gemma:
            cfg.norm_offset = 1.0
            cfg.embed_scale = math.sqrt(hidden)
            cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", False))
        if model_type == "gemma3_text":
            if get("use_bidirectional_attention", False):
                raise ModelLoadError("This Gemma 3 config uses bidirectional attention (an embedding model); "
                                     "fasttune trains causal language models.")
            cfg.qk_norm = True
        if model_type in ("gemma2", "gemma3_text"):
            cfg.sandwich_norm = True
            cfg.attn_scale = get("query_pre_attn_scalar") ** -0.5
            cfg.attn_logit_softcap = get("attn_logit_softcapping")
            cfg.final_logit_softcap = get("final_logit_softcapping")
        if model_type == "phi3":
            cfg.fused_qkv = cfg.fused_gate_up = True
            cfg.attn_bias = cfg.o_bias = False
        if model_type == "gpt_oss":
            cfg.attn_bias = cfg.o_bias = bool(get("attention_bias", True))
            cfg.attn_sinks = True
        if model_type in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):
            qwen3_5_fields(cfg, get)
        if model_type == "qwen3_next":  # Qwen3.5's layers with fused DeltaNet projections and plain (partial) RoPE
            cfg.linear_fused_projections = True
            cfg.mrope_section, cfg.mrope_interleaved = None, False
        if model_type == "nemotron_h":
            nemotron_h_fields(cfg, get)
        if model_type == "granitemoehybrid":
            granite_hybrid_fields(cfg, get)
            granite_multipliers(cfg, get)
        if model_type == "bamba":
            bamba_fields(cfg, get)
        if model_type == "falcon_h1":
            falcon_h1_fields(cfg, get)
        if model_type in ("lfm2", "lfm3", "lfm2_moe"):
            lfm2_fields(cfg, get)
        if model_type in ("glm4_moe_lite", "deepseek_v3", "deepseek_v2", "mistral4"):
            mla_fields(cfg, get)
        if model_type == "mistral4":  # Mistral Small 4: DeepSeek-V3's layers with Ministral 3's query scaling
            cfg.query_position_scale = llama4_query_scale(get)
        if model_type == "gemma4_text":
            gemma4_fields(cfg, get)
        if model_type in MOE_FAMILIES:
            moe_fields(cfg, get)
        cfg.sliding_windows = _sliding_windows(get, model_type, layers)
        first = layers - cfg.kv_shared_layers
        if {w is None for w in cfg.sliding_windows[first:]} - {w is None for w in cfg.sliding_windows[:first]}:
            raise ModelLoadError(f"The last {cfg.kv_shared_layers} layers reuse keys and values (num_kv_shared_layers) "
                                 f"of a kind of layer (sliding / full, layer_types) that no earlier layer computes; "
                                 f"fix config.json.")
        return cfg


def granite_multipliers(cfg: ModelConfig, get) -> None:
    """Granite's multipliers (transformers' GraniteConfig / GraniteMoeHybridConfig; each defaults to 1)."""
    cfg.embedding_multiplier = float(get("embedding_multiplier", 1.0))
    cfg.residual_multiplier = float(get("residual_multiplier", 1.0))
    cfg.logits_scaling = float(get("logits_scaling", 1.0))
    cfg.attn_scale = float(get("attention_multiplier", 1.0))


def decoder_runs(hf_config) -> bool:
    """Whether fasttune's decoder runs this transformers config: its family is in SUPPORTED_FAMILIES, and it uses none
    of the features of that family the decoder lacks (Gemma 4's bidirectional attention over all tokens, an embedding
    model's): the loaders send the rest to the transformers fallback."""
    get = (lambda k, d=None: hf_config.get(k, d)) if isinstance(hf_config, dict) else \
        (lambda k, d=None: getattr(hf_config, k, d))
    model_type = get("model_type")
    if model_type == "gemma4_text":
        return not gemma4_unsupported(get)
    return model_type in SUPPORTED_FAMILIES


def _rope_fields(get) -> tuple[float, dict | None, float, float | None]:
    """RoPE theta, scaling, partial factor and Gemma 3's local theta, from transformers 5 `rope_parameters`
    (flat, or keyed by layer type) or from the 4.x fields. Yarn gets the defaults transformers fills in:
    original_max_position_embeddings = max_position_embeddings, factor = their ratio when None."""
    params = dict(get("rope_parameters") or {})
    local_theta = get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3)
        local = params.get("sliding_attention") or {}
        local_theta = local.get("rope_theta", local_theta)
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError("RoPE scaling on sliding-window layers is not supported yet.")
        params = dict(params.get("full_attention") or {})
    legacy = get("rope_scaling") or {}
    default_theta = DEFAULT_THETAS.get(get("model_type"), 10000.0)
    theta = params.get("rope_theta", get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0
    scaling = dict(params) if params.get("rope_type", "default") != "default" else dict(legacy) or None
    if get("model_type") == "hunyuan_v1_dense" and scaling and scaling.get("alpha") and \
            scaling.get("rope_type", scaling.get("type")) == "dynamic":
        # Hunyuan's NTK-alpha RoPE: a fixed, larger base, theta * alpha ** (d / (d - 2)), whatever the length
        # (transformers' HunYuanDenseV1RotaryEmbedding.compute_ntk_alpha_rope_parameters)
        d = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        theta, scaling = float(theta) * float(scaling["alpha"]) ** (d / (d - 2)), None
    if scaling is not None and scaling.get("rope_type") == "proportional":
        partial = 1.0  # the whole head is the rotary dimension; the factor picks the pairs with a frequency
    if scaling is not None:
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] in ("default", "mrope"):  # "mrope": Qwen2-VL's 4.x name, plain frequencies
            scaling = None
        elif scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"RoPE scaling type '{scaling['rope_type']}' is not supported yet (supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)})."
            )
        elif scaling["rope_type"] == "yarn":
            old = scaling.get("original_max_position_embeddings") or get("original_max_position_embeddings") \
                or get("max_position_embeddings")
            scaling["original_max_position_embeddings"] = old
            if scaling.get("factor") is None:
                scaling["factor"] = get("max_position_embeddings") / old
    return float(theta), scaling, float(partial), (float(local_theta) if local_theta else None)


def _rope_layers(get, layers: int) -> list:
    """SmolLM3's RoPE layers as transformers' SmolLM3Config reads them: no_rope_layers[i] 1 = layer i rotates q/k,
    0 = no positional encoding; absent, every no_rope_layer_interval-th layer (i + 1 divisible by it) has none.
    Raises ModelLoadError for a list shorter than the layers or with entries other than 0/1."""
    given = get("no_rope_layers")
    if given is None:
        interval = int(get("no_rope_layer_interval", 4) or 4)
        return [(i + 1) % interval != 0 for i in range(layers)]
    if len(given) < layers or any(v not in (0, 1, True, False) for v in given):
        raise ModelLoadError(f"no_rope_layers in the model config must hold a 0 or 1 for each of the {layers} "
                             f"layers (1 = RoPE); it is {list(given)}. Fix config.json.")
    return [bool(v) for v in given[:layers]]


def _layer_types(get, model_type: str, layers: int) -> list | None:
    """The config's layer_types; for an EXAONE 4 config without them, Exaone4Config's: sliding_window_pattern as a
    period (every p-th layer full) or as letters ("LLLG": L local, G global) repeated from layer 0."""
    types = get("layer_types")
    if types or model_type != "exaone4" or get("sliding_window") is None:
        return types
    pattern = get("sliding_window_pattern", 4)
    if isinstance(pattern, str):
        return ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(layers)]
    return ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(layers)]


def _sliding_windows(get, model_type: str, layers: int) -> list:
    window = get("sliding_window")
    layer_types = _layer_types(get, model_type, layers)
    if model_type in ("qwen2", "qwen3", "qwen3_moe", "smollm3") + VISION_TEXT_FAMILIES:
        # Qwen (and SmolLM3's attention) only slide when use_sliding_window is set; Qwen only from
        # max_window_layers on (4.x semantics).
        if not get("use_sliding_window", False):
            return [None] * layers
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if model_type == "gemma2":
        return [window if i % 2 == 0 else None for i in range(layers)]
    if model_type in ("qwen2", "qwen3") + VISION_TEXT_FAMILIES:
        start = get("max_window_layers", layers)
        return [window if i >= start else None for i in range(layers)]
    if model_type in ("mistral", "phi3", "mixtral", "qwen3_moe") and window:
        return [window] * layers
    return [None] * layers
