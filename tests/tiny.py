"""Tiny random configs (hidden 64, 2 layers, GQA) for every family, and helpers to save them as HF checkpoints."""
import torch

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=0)


def hf_config(family: str, **overrides):
    import transformers as tf

    kw = dict(TINY)
    if family == "llama":
        cfg = tf.LlamaConfig(**kw, tie_word_embeddings=False)
    elif family == "mistral":
        cfg = tf.MistralConfig(**kw, sliding_window=None, tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**kw, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**kw, head_dim=32, tie_word_embeddings=True)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**kw, head_dim=16)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**kw, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**kw, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention"])
    elif family == "phi3":
        cfg = tf.Phi3Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    elif family == "smollm3":  # 4 layers: the 4th has no RoPE (the default interval, which llama.cpp assumes)
        kw.update(num_hidden_layers=4)
        cfg = tf.SmolLM3Config(**kw, tie_word_embeddings=True)
    elif family == "olmo2":
        cfg = tf.Olmo2Config(**kw, tie_word_embeddings=False)
    elif family == "olmo3":  # 4 layers: 3 sliding (window 4), the 4th full, Olmo3Config's (and llama.cpp's) layout
        kw.update(num_hidden_layers=4)
        cfg = tf.Olmo3Config(**kw, sliding_window=4, tie_word_embeddings=False)
    elif family == "granite":  # Granite 3's multipliers, away from 1 so a missed one shows
        cfg = tf.GraniteConfig(**kw, embedding_multiplier=12.0, residual_multiplier=0.22,
                               attention_multiplier=0.0078125, logits_scaling=8.0, tie_word_embeddings=True)
    elif family == "ministral":  # Ministral-8B's layout: sliding (window 4) and full layers by layer_types
        cfg = tf.MinistralConfig(**kw, head_dim=16, sliding_window=4, tie_word_embeddings=False,
                                 layer_types=["sliding_attention", "full_attention"])
    elif family == "ministral3":  # Ministral 3's text model: yarn RoPE, Llama 4's query scaling from position 8
        cfg = tf.Ministral3Config(**kw, head_dim=16, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 32.0,
                                                   "original_max_position_embeddings": 8, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                                   "llama_4_scaling_beta": 0.1})
    elif family == "exaone4":  # 4 layers: 3 sliding with RoPE (window 4), the 4th global without RoPE
        kw.update(num_hidden_layers=4)
        cfg = tf.Exaone4Config(**kw, head_dim=16, sliding_window=4, sliding_window_pattern=4,
                               tie_word_embeddings=False)
    elif family == "ernie4_5":  # adjacent-pair RoPE (Ernie-4.5-0.3B has no biases; test_ernie4_5.py adds them)
        cfg = tf.Ernie4_5Config(**kw, head_dim=16, tie_word_embeddings=True)
    elif family == "glm4":  # partial (half) adjacent-pair RoPE, q/k/v biases, fused gate_up, four norms
        cfg = tf.Glm4Config(**kw, head_dim=16, tie_word_embeddings=False)
    elif family == "hunyuan_v1_dense":  # q/k norms after RoPE; NTK-alpha RoPE (a larger base)
        cfg = tf.HunYuanDenseV1Config(**kw, head_dim=16, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0,
                                                       "factor": 1.0})
    elif family == "arcee":  # the ungated ReLU² MLP (up_proj, down_proj)
        cfg = tf.ArceeConfig(**kw, tie_word_embeddings=False)
    elif family == "seed_oss":  # Seed-OSS-36B's layout: q/k/v biases, none on o_proj or the MLP; no dropout
        cfg = tf.SeedOssConfig(**kw, head_dim=16, attention_bias=True, attention_out_bias=False, mlp_bias=False,
                               attention_dropout=0.0, residual_dropout=0.0, tie_word_embeddings=False)
    elif family == "cohere2":  # 4 layers: 3 sliding (window 4, adjacent-pair RoPE), the 4th full without RoPE;
        kw.update(num_hidden_layers=4)  # the parallel block, LayerNorms, logits x logit_scale (0.25: not 1)
        cfg = tf.Cohere2Config(**kw, head_dim=16, sliding_window=4, logit_scale=0.25, tie_word_embeddings=True,
                               layer_types=["sliding_attention"] * 3 + ["full_attention"])
    elif family == "cohere":  # Command R / Aya's layout: the parallel block, LayerNorms, adjacent-pair RoPE
        cfg = tf.CohereConfig(**kw, logit_scale=0.25, tie_word_embeddings=True)
    elif family == "apertus":  # xIELU in an ungated MLP, q/k norms, renamed pre-norms, llama3 RoPE (its default)
        cfg = tf.ApertusConfig(**kw, tie_word_embeddings=False)
    elif family == "qwen3_moe":  # 4 experts, top-2; layer 0 dense (mlp_only_layers) to cover both kinds
        cfg = tf.Qwen3MoeConfig(**kw, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False)
    elif family == "gpt_oss":  # sinks, biases, one sliding (window 4) and one full layer, yarn RoPE, 4 experts top-2
        kw.update(intermediate_size=32)
        cfg = tf.GptOssConfig(**kw, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                               "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                               "original_max_position_embeddings": 32})
    elif family == "qwen3_5_text":  # 4 layers: 3 gated-DeltaNet, then gated softmax attention; 2 key, 4 value heads
        kw.update(num_hidden_layers=4)
        cfg = tf.Qwen3_5TextConfig(**kw, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                   linear_key_head_dim=16, linear_value_head_dim=16, tie_word_embeddings=False,
                                   layer_types=["linear_attention"] * 3 + ["full_attention"])
    elif family == "qwen3_5_moe_text":  # Qwen3.5's layers with 4 experts (top 2) and a shared expert in every MLP
        kw.update(num_hidden_layers=4)
        kw.pop("intermediate_size")
        cfg = tf.Qwen3_5MoeTextConfig(**kw, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                      linear_key_head_dim=16, linear_value_head_dim=16, tie_word_embeddings=False,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48,
                                      layer_types=["linear_attention"] * 3 + ["full_attention"])
    elif family == "qwen3_next":  # Qwen3.5-MoE's layers with fused DeltaNet projections; layer 1 a dense MLP
        kw.update(num_hidden_layers=4)
        cfg = tf.Qwen3NextConfig(**kw, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                 linear_key_head_dim=16, linear_value_head_dim=16, tie_word_embeddings=False,
                                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                 layer_types=["linear_attention"] * 3 + ["full_attention"])
    elif family == "lfm2":  # 4 layers: short convolutions with attention (q/k norms) in layer 2; w1/w3/w2 MLP
        kw.update(num_hidden_layers=4, intermediate_size=192)  # Lfm2MLP's width: 2/3 of it, rounded up to 64
        cfg = tf.Lfm2Config(**kw, block_multiple_of=64, tie_word_embeddings=True,
                            layer_types=["conv", "conv", "full_attention", "conv"])
    elif family == "glm4_moe":  # layer 0 dense; 8 experts in 2 groups (best 1 kept), sigmoid top-2 with a score
        # bias, scaled by 2.5; a shared expert; q/k/v biases, q/k norms, half RoPE
        kw.update(num_hidden_layers=3)
        cfg = tf.Glm4MoeConfig(**kw, head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                               first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                               tie_word_embeddings=False, num_nextn_predict_layers=0)
    elif family == "ernie4_5_moe":  # ERNIE-4.5-21B-A3B's layout: layer 0 dense, then 8 experts (top 2, 32 wide)
        # chosen by probability + e_score_correction_bias, 2 shared experts; adjacent-pair RoPE
        kw.update(num_hidden_layers=3)
        cfg = tf.Ernie4_5_MoeConfig(**kw, head_dim=16, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
                                    moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1,
                                    tie_word_embeddings=True)
    elif family == "glm4_moe_lite":  # GLM-4.7-Flash: multi-head latent attention (q latent 24, kv latent 32,
        # 12 + 8 query/key channels, 16 value channels, interleaved RoPE); GLM-4.5's MoE, layer 0 dense
        kw.update(num_hidden_layers=3, num_key_value_heads=4)  # every head has its own key from the latent
        cfg = tf.Glm4MoeLiteConfig(**kw, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=8,
                                   v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                   n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, tie_word_embeddings=False)
    elif family == "deepseek_v3":  # as glm4_moe_lite, with DeepSeek-V3's names: layers 0-1 dense, yarn RoPE with
        # mscale (the score scale grows), values narrower than queries and keys
        kw.update(num_hidden_layers=3, num_key_value_heads=4)
        cfg = tf.DeepseekV3Config(**kw, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=8,
                                  v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                  first_k_dense_replace=2, norm_topk_prob=True, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 64, "mscale": 1.0,
                                                   "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0})
    elif family == "deepseek_v2":  # DeepSeek-V2's MLA with softmax routing limited to the best of 2 expert groups
        # (never renormalised, scaled by 2.5), layer 0 dense, interleaved RoPE
        kw.update(num_hidden_layers=3, num_key_value_heads=4)
        cfg = tf.DeepseekV2Config(**kw, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=8,
                                  v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, n_group=2, topk_group=1, topk_method="group_limited_greedy",
                                  routed_scaling_factor=2.5, first_k_dense_replace=1, tie_word_embeddings=False)
    elif family == "mistral4":  # Mistral Small 4: DeepSeek-V3's MLA and layers with softmax routing (2 groups by
        # their two best scores, best 1 kept, renormalised, scaled by 2.5), layer 0 dense, yarn RoPE with mscale and
        # Ministral 3's query scaling from position 8 on
        kw.update(num_hidden_layers=3, num_key_value_heads=4)
        cfg = tf.Mistral4Config(**kw, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=8,
                                v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                first_k_dense_replace=1, norm_topk_prob=True, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0,
                                                 "original_max_position_embeddings": 8, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                 "llama_4_scaling_beta": 0.1})
    elif family == "lfm2_moe":  # LFM2's layers (conv, attention, conv, conv) with a dense first MLP, then 8 experts
        # routed by sigmoid score + expert_bias (top 2, renormalised, scaled by 1.5)
        kw.update(num_hidden_layers=4, intermediate_size=96)
        cfg = tf.Lfm2MoeConfig(**kw, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_dense_layers=1,
                               routed_scaling_factor=1.5, tie_word_embeddings=True,
                               layer_types=["conv", "full_attention", "conv", "conv"])
    elif family == "lfm3":  # conv, sliding attention (window 4, plain RoPE), full attention (proportional RoPE on
        # half the pairs), conv; four norms per layer, a sigmoid gate per attention head
        kw.update(num_hidden_layers=4)
        cfg = tf.Lfm3Config(**kw, head_dim=16, sliding_window=4, tie_word_embeddings=True,
                            layer_types=["conv", "sliding_attention", "full_attention", "conv"])
    elif family == "gemma4_text":  # Gemma 4's 31B layout: a sliding layer (window 4, head 16, plain RoPE), then a
        # full one with wider heads (32), one key/value head whose values are the keys (attention_k_eq_v) and
        # proportional RoPE on a quarter of the pairs; final-logit soft-cap
        cfg = tf.Gemma4TextConfig(**kw, head_dim=16, global_head_dim=32, sliding_window=4, attention_k_eq_v=True,
                                  num_global_key_value_heads=1, hidden_size_per_layer_input=0,
                                  final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"])
    elif family == "gemma4_e2b":  # Gemma 4 E2B's layout: per-layer embeddings (8 channels a layer) and layers 2-3
        # reusing the keys and values of layers 0 (sliding) and 1 (full), their MLPs twice as wide
        kw.update(num_hidden_layers=4)
        cfg = tf.Gemma4TextConfig(**kw, head_dim=16, global_head_dim=32, sliding_window=4, attention_k_eq_v=False,
                                  hidden_size_per_layer_input=8, vocab_size_per_layer_input=300,
                                  num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    elif family == "gemma4_moe":  # Gemma 4 26B-A4B's layout on the 31B's attention: 4 experts (top 2) beside each
        # layer's dense MLP
        cfg = tf.Gemma4TextConfig(**kw, head_dim=16, global_head_dim=32, sliding_window=4, attention_k_eq_v=True,
                                  num_global_key_value_heads=1, hidden_size_per_layer_input=0, enable_moe_block=True,
                                  num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                  final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"])
    elif family in ("granitemoehybrid", "granitemoehybrid_moe"):  # Granite 4.0-H's layout: Mamba-2 layers (8 heads
        # of 16, 2 groups, state 8) around a NoPE attention layer, the shared MLP, Granite's multipliers away from 1;
        # _moe: Granite 4.0-H Tiny's, 4 experts (top 2, 48 wide) beside the shared MLP
        moe = family.endswith("_moe")
        kw.update(num_hidden_layers=4, intermediate_size=48 if moe else kw["intermediate_size"])
        cfg = tf.GraniteMoeHybridConfig(**kw, shared_intermediate_size=96, num_local_experts=4 if moe else 0,
                                        num_experts_per_tok=2,
                                        layer_types=["linear_attention", "full_attention", "linear_attention",
                                                     "linear_attention"],
                                        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                                        mamba_expand=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                                        attention_multiplier=0.0078125, logits_scaling=8.0, tie_word_embeddings=True)
    elif family in ("nemotron_h", "nemotron_h_moe"):  # Nemotron-H's layout: Mamba-2 (8 heads of 16, 2 groups, state
        # 8), ReLU² MLP, NoPE attention, MLP, Mamba; _moe: Nemotron 3's, the MLPs as 8 ReLU² experts (top 2 of 2
        # groups, best 1 kept, scaled by 2.5) beside a shared expert
        kw.update(num_hidden_layers=5)
        moe = family.endswith("_moe")
        kinds = ["mamba", "moe" if moe else "mlp", "attention", "moe" if moe else "mlp", "mamba"]
        if moe:
            kw.update(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, routed_scaling_factor=2.5)
        cfg = tf.NemotronHConfig(**kw, head_dim=16, layers_block_type=kinds,
                                 mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
                                 use_conv_bias=True, tie_word_embeddings=False, layer_norm_epsilon=1e-5)
    elif family == "bamba":  # Bamba-9B's layout: Granite 4.0's Mamba-2 layers around an attention layer that rotates
        # half of each head, a Llama MLP (feed_forward)
        kw.update(num_hidden_layers=4)
        cfg = tf.BambaConfig(**kw, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
                             mamba_d_state=8, mamba_expand=2, tie_word_embeddings=False)
    elif family == "falcon_h1":  # Falcon-H1's layout: attention (RoPE) and Mamba-2 (8 heads of 16, 2 groups, state
        # 8) side by side in every layer, its µP multipliers away from 1, the Mamba gated norm (norm before the gate)
        cfg = tf.FalconH1Config(**kw, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
                                mamba_n_groups=2, mamba_d_state=8, mamba_rms_norm=True, mamba_norm_before_gate=True,
                                embedding_multiplier=3.0, lm_head_multiplier=0.4, key_multiplier=0.7,
                                attention_in_multiplier=1.3, attention_out_multiplier=0.8, ssm_in_multiplier=1.2,
                                ssm_out_multiplier=0.6, ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.3],
                                mlp_multipliers=[1.4, 0.7], tie_word_embeddings=False)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**kw, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                               tie_word_embeddings=False)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2",
            "olmo3", "granite", "ministral", "ministral3", "exaone4", "ernie4_5", "glm4",
            "hunyuan_v1_dense", "arcee", "apertus", "qwen3_5_text", "lfm2", "granitemoehybrid", "nemotron_h", "bamba",
            "falcon_h1"]
try:  # LFM3 came with transformers 5.2x; an older transformers (a GPU machine's) runs the others
    from transformers import Lfm3Config  # noqa: F401

    FAMILIES.append("lfm3")
except ImportError:
    pass
try:  # Cohere 2 (Command R7B, Command A)
    from transformers import Cohere2Config  # noqa: F401

    FAMILIES += ["cohere", "cohere2"]
except ImportError:
    pass
try:  # Seed-OSS: transformers 5.x (a GPU machine's older one runs the others)
    from transformers import SeedOssConfig  # noqa: F401

    FAMILIES.append("seed_oss")
except ImportError:
    pass
try:  # Gemma 4: transformers 5.5 and later
    from transformers import Gemma4TextConfig  # noqa: F401

    FAMILIES.append("gemma4_text")
except ImportError:
    pass
MOE_FAMILIES = ["qwen3_moe", "mixtral"]  # not in FAMILIES: the dense families' tests stay as they are


def causal_lm_class(model_type: str):
    """transformers' causal LM class for a model_type: AutoModelForCausalLM, or the family's own class where
    transformers leaves it out of that mapping (Mistral 4's Mistral4ForCausalLM)."""
    import transformers

    return getattr(transformers, "Mistral4ForCausalLM") if model_type == "mistral4" else \
        transformers.AutoModelForCausalLM


MAMBA_DRAWN = ("A_log", "dt_bias", ".D", "conv1d.bias")


def hf_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    cls = causal_lm_class(cfg.model_type)
    build = getattr(cls, "from_config", None) or cls._from_config  # (a concrete class has only _from_config)
    model = build(cfg, attn_implementation="eager").float().eval()
    # Random norm weights so a wrong (1 + w) or norm placement shows in the logits.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # Gemma's and Qwen3.5's RMSNorms scale by (1 + w) (not Qwen3.5's gated norm)
                centred = (family.startswith("gemma") and not family.startswith("gemma4")) or \
                    (family.startswith(("qwen3_5", "qwen3_next")) and "linear_attn" not in n)
                p.normal_(0.0 if centred else 1.0, 0.1)
            if (".mamba." in n or ".mixer." in n) and n.endswith(MAMBA_DRAWN):  # Mamba-2 parameters transformers
                p.normal_(0.0, 0.5)  # starts at fixed values (A_log = log 1..H, D = dt_bias = 1, conv bias 0)
            if n.endswith(("mlp.gate.weight", "mlp.router.weight", "router.proj.weight", "feed_forward.gate.weight",
                           "block_sparse_moe.router.weight")):
                # decisive routing
                p.normal_(0.0, 0.5)
            if n.endswith(("router.scale", "router.per_expert_scale")):  # Gemma 4's router scales: away from 1
                p.uniform_(0.5, 1.5)
            if n.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):  # Apertus' xIELU: away from its initial values
                p.normal_(0.0, 0.5)
            # transformers starts these biases at 0: make them matter
            if family.startswith(("glm4_moe", "deepseek", "ernie4_5_moe", "nemotron_h_moe")) and n.endswith("bias"):
                p.normal_(0.0, 0.5)
            if family == "gpt_oss":  # transformers starts biases at 0 and sinks near 0: make them matter
                if n.endswith(("bias", "sinks")):
                    p.normal_(0.0, 0.5)
                if n.endswith("experts.gate_up_proj"):  # pre-activations beyond the clamp limit 7 occur
                    p.normal_(0.0, 0.6)
        for n, b in model.named_buffers():
            if n.endswith(("e_score_correction_bias", "expert_bias")):  # GLM-4.5's, LFM2-MoE's routing bias: away
                # from 0 so it shows
                b.normal_(0.0, 0.3)
            if n.endswith("layer_scalar"):  # Gemma 4's per-layer output scale: away from 1 so a missed one shows
                b.uniform_(0.5, 1.5)
    return model


def saved_pair(family: str, folder, tokenizer, **overrides):
    """(transformers' tiny `family` model (hf_model with `overrides`), ours loaded in fp32 from it, saved with
    `tokenizer` to `folder`)."""
    from fasttune import FastLanguageModel

    hf = hf_model(family, **overrides)
    save_hf(hf, folder, tokenizer)
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    return hf, model


def save_hf(model, folder, tokenizer=None):
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def lora_losses(model, ids, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """Per-step losses of `steps` AdamW steps on the trainable parameters, labels = ids (a does-it-train check)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def check_bf16_lora_and_graph_decode(folder, monkeypatch) -> None:
    """On CUDA, the model in `folder` in bf16: LoRA with recompute trains (loss falls over 6 steps), and greedy
    generation through the CUDA-graph decode equals the eager decode (a recurrent layer's conv and state are updated in
    place inside the graph), on a left-padded batch."""
    from fasttune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=True)
    ids = torch.randint(3, 300, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    losses = lora_losses(model, ids, steps=6)
    assert losses[-1] < losses[0]
    prompt = ids[:, :20]
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding
    graphed = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False)
    monkeypatch.setenv("FASTTUNE_CUDA_GRAPHS", "0")
    eager = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(graphed, eager)


def load_classifier(folder, num_labels: int = 3, lora_r: int | None = None, **kwargs):
    """(fasttune's sequence classifier loaded in fp32 from the checkpoint in `folder` with a new `num_labels` head,
    its tokenizer); the head's draw seeded (0); with lora_r, LoRA of that rank added (no recompute)."""
    from transformers import AutoModelForSequenceClassification

    from fasttune import FastLanguageModel

    torch.manual_seed(0)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, num_labels=num_labels,
                                                   auto_model=AutoModelForSequenceClassification, **kwargs)
    if lora_r:
        model = FastLanguageModel.get_peft_model(model, r=lora_r, use_gradient_checkpointing=False)
    return model, tok


def right_padded_batch(seed: int = 4):
    """(ids (2, 12) in [3, 300), attention mask with row 1 right-padded from position 9)."""
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask
