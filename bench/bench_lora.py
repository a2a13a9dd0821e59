"""LoRA training throughput and peak memory: fasttune vs transformers+PEFT, same GPU, same run.

Random-init weights of real shapes (no downloads), LoRA r16 on the 7 projections, bs x seq random tokens drawn
once and cycled (so the loss must fall), AdamW, grad clipping 1.0. Each (impl, shape, checkpointing) runs in its
own process for a clean peak-memory reading. Every run asserts grad-norm > 0 and a falling loss, then appends a
JSONL row to bench/results/. Usage on a GPU machine:

    python bench/bench_lora.py --matrix default          # the table below, one process per row
    python bench/bench_lora.py --impl ours --shape llama-3.2-1b --gc on   # a single row
    python bench/bench_lora.py --matrix qlora                             # NF4 QLoRA vs transformers+PEFT+bnb
    python bench/bench_lora.py --matrix moe-qlora [--expert-lora]         # Qwen3-30B-A3B shape, NF4 experts
    python bench/bench_lora.py --matrix gpt-oss [--expert-lora]           # gpt-oss-20b shape, bf16 experts
    python bench/bench_lora.py --matrix glm4-moe-lite [--expert-lora]     # GLM-4.7-Flash, 16 layers
    python bench/bench_lora.py --matrix mistral4                          # Mistral Small 4, 8 layers
    python bench/bench_lora.py --max-context --impl ours --quant nf4 --gc offload   # longest bs-1 sequence
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # transformers' SmolLM3Config: no RoPE in every 4th layer (its default no_rope_layer_interval), SmolLM3-3B's shape
    "smollm3-3b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                       max_position_embeddings=65536, rope_theta=5e6, rms_norm_eps=1e-6),
    # Olmo3Config: post-norm layers, whole-projection q/k norms, 3 sliding (4096) : 1 full layers; OLMo-3-7B's shape
    "olmo-3-7b": dict(vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, sliding_window=4096,
                      max_position_embeddings=65536, rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # GraniteConfig with Granite-3.3-8B's shape and multipliers
    "granite-3.3-8b": dict(vocab_size=49159, hidden_size=4096, intermediate_size=12800, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, embedding_multiplier=12.0,
                           residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=16.0,
                           max_position_embeddings=131072, rope_theta=1e7, rms_norm_eps=1e-5,
                           tie_word_embeddings=True),
    # Glm4Config (half, adjacent-pair RoPE; fused gate_up; four norms), GLM-4-9B-0414's shape
    "glm-4-9b": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False),
    # Qwen3_5TextConfig's defaults are Qwen3.5-9B's language model: 24 gated-DeltaNet layers (16 key / 32 value
    # heads of 128) and 8 gated-attention layers (16 heads of 256, 4 KV heads, a quarter rotated)
    "qwen3.5-9b": dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=256, tie_word_embeddings=False),
    # transformers' Lfm2Config with LFM2-1.2B's config.json: 10 short-convolution and 6 attention layers, MLP width
    # 8192 (Lfm2MLP's rule on block_ff_dim 12288)
    "lfm2-1.2b": dict(vocab_size=65536, hidden_size=2048, intermediate_size=12288, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                      conv_L_cache=3, max_position_embeddings=128000, norm_eps=1e-5, tie_word_embeddings=True),
    # transformers' Lfm2MoeConfig defaults (LFM2-8B-A1B's sizes: the first two layers dense, then 32 experts of
    # 1792, top 4, routed by sigmoid score + expert_bias); 24 layers, 6 of them attention (positions chosen here)
    "lfm2-8b-a1b": dict(vocab_size=65536, hidden_size=2048, intermediate_size=7168, moe_intermediate_size=1792,
                        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8, num_experts=32,
                        num_experts_per_tok=4, num_dense_layers=2, max_position_embeddings=128000,
                        tie_word_embeddings=True,
                        layer_types=["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv" for i in range(24)]),
    # transformers' Lfm3Config defaults (LFM3-1.7B: 24 layers, conv / sliding (256) / full attention, head gates)
    "lfm3-1.7b": dict(vocab_size=128000, hidden_size=2048, intermediate_size=7680, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=128, tie_word_embeddings=True),
    # transformers' Gemma4TextConfig with Gemma-4-31B's text sizes as I read its config.json (not checked offline):
    # sliding (1024) : full layers 5 : 1, heads of 256 (sliding) and 512 (full, 4 key/value heads whose values are the
    # keys), final-logit soft-cap 30; cut to 12 of its 60 layers (2 full) so the bf16 weights load quickly
    "gemma-4-31b-12l": dict(vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=12,
                            num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                            num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
                            hidden_size_per_layer_input=0, final_logit_softcapping=30.0, tie_word_embeddings=True,
                            max_position_embeddings=262144),
    # transformers' Gemma4TextConfig defaults (30 layers, hidden 2,304, per-layer embeddings of 256 channels, sliding
    # window 512) with the last 10 layers reusing keys and values and their MLPs twice as wide, E2B / E4B's features
    # (not a released size: those were not checked offline)
    "gemma-4-ple-30l": dict(vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, global_head_dim=512,
                            hidden_size_per_layer_input=256, sliding_window=512, num_kv_shared_layers=10,
                            use_double_wide_mlp=True, tie_word_embeddings=True),
    # Gemma4TextConfig with Gemma-4-26B-A4B's text sizes as I recall its config.json (not checked offline): 128 experts
    # of 704 (top 8) beside each layer's dense MLP of 2,112, hidden 2,816, 16 heads; cut to 10 of its 30 layers
    "gemma-4-26b-a4b-10l": dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=10,
                                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                                num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
                                hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
                                top_k_experts=8, moe_intermediate_size=704, final_logit_softcapping=30.0,
                                tie_word_embeddings=True),
    # transformers' Gemma3TextConfig with Gemma-3-4B's text sizes as I recall its config.json (not checked offline):
    # 34 layers, sliding (1024) : full 5 : 1, 8 heads of 256 over 4 key/value heads
    "gemma-3-4b": dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                       query_pre_attn_scalar=256, tie_word_embeddings=True, max_position_embeddings=131072),
    # transformers' GraniteMoeHybridConfig with granite-4.0-h-micro's sizes as I recall its config.json (not checked
    # offline): 40 layers, 4 of them NoPE attention (positions chosen here), Mamba-2 with 64 heads of 64 and state 128
    "granite-4.0-h-micro": dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192,
                                shared_intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                                num_key_value_heads=8, num_local_experts=0,
                                layer_types=["full_attention" if i in (9, 18, 27, 36) else "linear_attention"
                                             for i in range(40)],
                                mamba_n_heads=64, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                                mamba_expand=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.0078125, logits_scaling=8.0, tie_word_embeddings=True,
                                max_position_embeddings=131072),
    # Granite 4.0-H Tiny (7B, ~1B active) as I recall its config.json (not checked offline): 64 experts of 512, top 6,
    # beside a shared MLP of 1,024 in every layer; LoRA on attention, the shared MLP and the Mamba projections on both
    # sides (the experts frozen: PEFT maps no names to them on this family)
    "granite-4.0-h-tiny": dict(vocab_size=100352, hidden_size=1536, intermediate_size=512,
                               shared_intermediate_size=1024, num_hidden_layers=40, num_attention_heads=12,
                               num_key_value_heads=4, num_local_experts=64, num_experts_per_tok=6,
                               layer_types=["full_attention" if i in (5, 15, 25, 35) else "linear_attention"
                                            for i in range(40)],
                               mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                               mamba_expand=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                               attention_multiplier=0.0078125, logits_scaling=6.0, tie_word_embeddings=True),
    # transformers' NemotronHConfig with Nemotron Nano 2 9B's sizes as I recall its config.json (not checked offline):
    # 56 layers of Mamba-2 (128 heads of 80, 8 groups, state 128), ReLU² MLPs (15,680) and 4 NoPE attention layers
    "nemotron-nano-9b-v2": dict(vocab_size=131072, hidden_size=4480, intermediate_size=15680, num_hidden_layers=56,
                                num_attention_heads=40, num_key_value_heads=8, head_dim=128, mamba_num_heads=128,
                                mamba_head_dim=80, n_groups=8, ssm_state_size=128, tie_word_embeddings=False,
                                layers_block_type=[("attention" if i in (13, 27, 41, 55) else "mlp") if i % 2 else
                                                   "mamba" for i in range(56)]),
    # transformers' BambaConfig with IBM's Bamba-9B sizes as I recall its config.json (not checked offline): 32 layers,
    # attention at 9 / 18 / 27 (half-rotary), Mamba-2 with 128 heads of 64, one group, state 128
    "bamba-9b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, attn_layer_indices=[9, 18, 27], mamba_n_heads=128,
                     mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_expand=2, tie_word_embeddings=False),
    # transformers' Ernie4_5_MoeConfig with ERNIE-4.5-21B-A3B's sizes as I recall its config.json (not checked
    # offline): 64 experts of 1,536 (top 6) and 2 shared, layer 0 dense; cut to 10 of its 28 layers
    "ernie-4.5-21b-a3b-10l": dict(vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=10,
                                  num_attention_heads=20, num_key_value_heads=4, head_dim=128, moe_num_experts=64,
                                  moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
                                  moe_layer_start_index=1, tie_word_embeddings=True),
    # transformers' Qwen2Config (q/k/v biases), Qwen2.5-14B's shape
    "qwen2.5-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
}
# The transformers config class of the SHAPES that are neither Llama nor Qwen2 (their keyword arguments are whole).
OTHER_CONFIGS = {"smollm3-3b": "SmolLM3Config", "olmo-3-7b": "Olmo3Config", "granite-3.3-8b": "GraniteConfig",
                 "glm-4-9b": "Glm4Config", "qwen3.5-9b": "Qwen3_5TextConfig", "lfm2-1.2b": "Lfm2Config",
                 "lfm3-1.7b": "Lfm3Config", "gemma-4-31b-12l": "Gemma4TextConfig", "lfm2-8b-a1b": "Lfm2MoeConfig",
                 "gemma-4-ple-30l": "Gemma4TextConfig", "gemma-4-26b-a4b-10l": "Gemma4TextConfig",
                 "gemma-3-4b": "Gemma3TextConfig", "granite-4.0-h-micro": "GraniteMoeHybridConfig",
                 "nemotron-nano-9b-v2": "NemotronHConfig", "ernie-4.5-21b-a3b-10l": "Ernie4_5_MoeConfig",
                 "bamba-9b": "BambaConfig", "granite-4.0-h-tiny": "GraniteMoeHybridConfig"}
# Mixture-of-experts shapes (transformers' Qwen3MoeConfig), top-8 of 128 experts per token. LoRA goes on attention
# only, or with --expert-lora on the experts too (the seven names: PEFT and fasttune both read the MLP names of an
# MoE model as the stacked experts, gate_up_proj at rank 2r).
MOE_SHAPES = {
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          tie_word_embeddings=False, rope_theta=1e6),
    # transformers' GptOssConfig defaults are gpt-oss-20b's: 24 layers, 32 experts top-4, sliding (128) / full
    # layers, attention sinks, yarn RoPE; the checkpoint's MXFP4 experts are bf16 here (random init)
    "gpt-oss-20b": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, tie_word_embeddings=False),
    # transformers' Glm4MoeConfig with GLM-4.5-Air's sizes (its config.json as I read it: 128 experts of 1408, top 8,
    # one shared expert, the first layer dense, q/k/v biases, half RoPE), cut to 8 of its 46 layers to fit bf16
    "glm-4.5-air-8l": dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                           num_hidden_layers=8, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                           n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                           attention_bias=True, use_qk_norm=False, num_nextn_predict_layers=0,
                           tie_word_embeddings=False),
    # transformers' Glm4MoeLiteConfig, whose defaults are GLM-4.7-Flash's (multi-head latent attention: q latent 768,
    # kv latent 512, 192 + 64 query/key channels, 256 value channels, 20 heads; 64 experts of 1536, top 4, one shared;
    # layer 0 dense), cut to 16 of its 47 layers so that the bf16 weights load quickly
    "glm-4.7-flash-16l": dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536,
                              num_hidden_layers=16, num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768,
                              kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
                              n_routed_experts=64, num_experts_per_tok=4, n_shared_experts=1,
                              routed_scaling_factor=1.8, norm_topk_prob=True, tie_word_embeddings=False),
    # transformers' Mistral4Config, whose defaults are Mistral Small 4's (latent attention: q latent 1024, kv latent
    # 256, 64 + 64 query/key channels, 128 value channels, 32 heads; 128 experts of 2048, top 4, one shared expert,
    # softmax routing; yarn RoPE with query scaling), cut to 8 of its 36 layers to fit bf16
    "mistral-small-4-8l": dict(vocab_size=131072, hidden_size=4096, intermediate_size=12288,
                               moe_intermediate_size=2048, num_hidden_layers=8, num_attention_heads=32,
                               num_key_value_heads=32, q_lora_rank=1024, kv_lora_rank=256, qk_nope_head_dim=64,
                               qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=128, num_experts_per_tok=4,
                               n_shared_experts=1, norm_topk_prob=True, tie_word_embeddings=False),
}
# PEFT maps no MLP names onto gpt-oss's experts: with --expert-lora its LoraConfig names them as the adapter
# fasttune writes for the seven names does (target_parameters, gate_up_proj at rank 2r / alpha 2r).
GPT_OSS_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (impl, shape, gradient checkpointing, our kernels: FASTTUNE_KERNELS, base weights: none = bf16 | nf4 | fp8)
MATRIX = {
    "default": [("hf", "llama-3.2-1b", "on", "-", "none"), ("ours", "llama-3.2-1b", "on", "triton", "none"),
                ("ours", "llama-3.2-1b", "off", "triton", "none"), ("ours", "llama-3.2-1b", "off", "torch", "none"),
                ("hf", "llama-3.1-8b", "on", "-", "none"), ("ours", "llama-3.1-8b", "on", "triton", "none"),
                ("ours", "llama-3.1-8b", "on", "torch", "none"), ("ours", "llama-3.1-8b", "off", "triton", "none")],
    "glm4-moe": [("hf", "glm-4.5-air-8l", "on", "-", "none"), ("ours", "glm-4.5-air-8l", "on", "triton", "none"),
                 ("ours", "glm-4.5-air-8l", "off", "triton", "none")],
    "mistral4": [("hf", "mistral-small-4-8l", "on", "-", "none"), ("ours", "mistral-small-4-8l", "on", "triton", "none"),
                 ("ours", "mistral-small-4-8l", "off", "triton", "none"),
                 ("ours", "mistral-small-4-8l", "on", "triton", "nf4")],
    "glm4-moe-lite": [("hf", "glm-4.7-flash-16l", "on", "-", "none"),
                      ("ours", "glm-4.7-flash-16l", "on", "triton", "none"),
                      ("ours", "glm-4.7-flash-16l", "off", "triton", "none")],
    "moe": [("hf", "qwen3-30b-a3b", "on", "-", "none"), ("ours", "qwen3-30b-a3b", "on", "triton", "none"),
            ("ours", "qwen3-30b-a3b", "off", "triton", "none")],
    # transformers + bitsandbytes quantises the Linears only: its stacked MoE experts stay bf16
    "moe-qlora": [("hf", "qwen3-30b-a3b", "on", "-", "nf4"), ("ours", "qwen3-30b-a3b", "on", "triton", "nf4")],
    # transformers runs gpt-oss with eager attention (its sinks have no SDPA path there)
    "gpt-oss": [("hf", "gpt-oss-20b", "on", "-", "none"), ("ours", "gpt-oss-20b", "on", "triton", "none"),
                ("ours", "gpt-oss-20b", "off", "triton", "none"), ("ours", "gpt-oss-20b", "on", "triton", "nf4")],
    # Qwen3.5-9B's language model; both sides run flash-linear-attention's delta-rule kernels when it is installed
    "qwen3.5": [("hf", "qwen3.5-9b", "on", "-", "none"), ("ours", "qwen3.5-9b", "on", "triton", "none"),
                ("ours", "qwen3.5-9b", "off", "triton", "none"), ("hf", "qwen3.5-9b", "on", "-", "nf4"),
                ("ours", "qwen3.5-9b", "on", "triton", "nf4")],
    "lfm2-moe": [("hf", "lfm2-8b-a1b", "on", "-", "none"), ("ours", "lfm2-8b-a1b", "on", "triton", "none"),
                 ("ours", "lfm2-8b-a1b", "off", "triton", "none"), ("ours", "lfm2-8b-a1b", "on", "triton", "nf4")],
    "lfm2": [("hf", "lfm2-1.2b", "on", "-", "none"), ("ours", "lfm2-1.2b", "on", "triton", "none"),
             ("ours", "lfm2-1.2b", "off", "triton", "none"), ("hf", "lfm2-1.2b", "on", "-", "nf4"),
             ("ours", "lfm2-1.2b", "on", "triton", "nf4")],
    "gemma3": [("hf", "gemma-3-4b", "on", "-", "none"), ("ours", "gemma-3-4b", "on", "triton", "none"),
               ("ours", "gemma-3-4b", "off", "triton", "none")],
    "gemma4": [("hf", "gemma-4-31b-12l", "on", "-", "none"), ("ours", "gemma-4-31b-12l", "on", "triton", "none"),
               ("ours", "gemma-4-31b-12l", "off", "triton", "none"),
               ("ours", "gemma-4-31b-12l", "on", "triton", "nf4")],
    # LoRA on attention and the dense MLPs on both sides (the experts frozen: PEFT needs target_parameters for them)
    "gemma4-moe": [("hf", "gemma-4-26b-a4b-10l", "on", "-", "none"),
                   ("ours", "gemma-4-26b-a4b-10l", "on", "triton", "none"),
                   ("ours", "gemma-4-26b-a4b-10l", "off", "triton", "none"),
                   ("ours", "gemma-4-26b-a4b-10l", "on", "triton", "nf4")],
    "gemma4-ple": [("hf", "gemma-4-ple-30l", "on", "-", "none"), ("ours", "gemma-4-ple-30l", "on", "triton", "none"),
                   ("ours", "gemma-4-ple-30l", "off", "triton", "none")],
    "lfm3": [("hf", "lfm3-1.7b", "on", "-", "none"), ("ours", "lfm3-1.7b", "on", "triton", "none"),
             ("ours", "lfm3-1.7b", "off", "triton", "none")],
    # the Mamba-2 hybrids (transformers' side: its torch scan, mamba_ssm not installed) and ERNIE 4.5 MoE (LoRA on the
    # experts on both sides: PEFT maps the MLP names to them)
    "granite-h": [("hf", "granite-4.0-h-micro", "on", "-", "none"),
                  ("ours", "granite-4.0-h-micro", "on", "triton", "none"),
                  ("ours", "granite-4.0-h-micro", "off", "triton", "none")],
    "nemotron-h": [("hf", "nemotron-nano-9b-v2", "on", "-", "none"),
                   ("ours", "nemotron-nano-9b-v2", "on", "triton", "none"),
                   ("ours", "nemotron-nano-9b-v2", "on", "triton", "nf4")],
    "granite-h-tiny": [("hf", "granite-4.0-h-tiny", "on", "-", "none"),
                       ("ours", "granite-4.0-h-tiny", "on", "triton", "none"),
                       ("ours", "granite-4.0-h-tiny", "off", "triton", "none")],
    "bamba": [("hf", "bamba-9b", "on", "-", "none"), ("ours", "bamba-9b", "on", "triton", "none"),
              ("ours", "bamba-9b", "on", "triton", "nf4")],
    "ernie-moe": [("hf", "ernie-4.5-21b-a3b-10l", "on", "-", "none"),
                  ("ours", "ernie-4.5-21b-a3b-10l", "on", "triton", "none"),
                  ("ours", "ernie-4.5-21b-a3b-10l", "off", "triton", "none")],
    # load_in_fp8 (ours only: transformers + PEFT has no FP8 training path; its bf16 rows are the baseline)
    "fp8": [("hf", "llama-3.1-8b", "on", "-", "none"), ("ours", "llama-3.1-8b", "on", "triton", "none"),
            ("ours", "llama-3.1-8b", "on", "triton", "fp8"), ("ours", "llama-3.1-8b", "off", "triton", "none"),
            ("ours", "llama-3.1-8b", "off", "triton", "fp8")],
    "qlora": [("hf", "llama-3.1-8b", "on", "-", "nf4"), ("ours", "llama-3.1-8b", "on", "triton", "nf4"),
              ("ours", "llama-3.1-8b", "offload", "triton", "nf4"), ("ours", "llama-3.1-8b", "off", "triton", "nf4"),
              ("ours", "llama-3.1-8b", "offload", "triton", "none")],
}


EXPERT_LORA = [False]  # --expert-lora (set in main)
OFFLOAD_EMBEDDING = [False]  # --offload-embedding (set in main): ours keeps the input embedding in host memory
OFFLOAD_LM_HEAD = [False]  # --offload-lm-head (set in main): ours keeps the LM head in host memory, streamed
CUDA_GRAPHS = [False]  # --cuda-graphs (set in main): ours replays forward+backward as a CUDA graph
LEAN_SAVES = [False]  # --lean-saves (set in main): ours' kept layers rebuild norm / activation outputs in backward
NO_LEAN = [False]  # --no-lean (set in main): --gc auto's pick without lean saves
NO_PARTIAL_OFFLOAD = [False]  # --no-partial-offload (set in main): --gc auto's pick with every input on the GPU
MEMORY_CAP_GIB = [None]  # --memory-cap-gib (set in main): the GPU memory the process may use, as a smaller card
KEEP_BLOCK = ["auto"]  # --keep-block (set in main): the kept attention block's cost model, or always / never
RECOMPUTE_LAYERS = [None]  # --recompute-layers (set in main): ours recomputes only the first N layers
# --token-stats / --label-smoothing (set in main): ours' model call asks for TRL's SFT token metrics too, or smooths
TOKEN_STATS = [{}]


# Qwen3.5's linear-attention projections, adapted too on both sides (fasttune's default targets for Qwen3.5)
LINEAR_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj"]


# LFM2's names for the seven, plus its short convolutions' projections (fasttune's defaults for LFM2); LFM3 keeps
# Llama's o_proj
LFM2_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]
LFM3_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "w1", "w2", "w3"]
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # multi-head latent attention


GRANITE_H_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear", "in_proj", "out_proj"]
NEMOTRON_H_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "in_proj"]  # (PEFT: no out_proj)


def targets(shape: str) -> list[str]:
    if shape.startswith("granite-4.0-h"):
        return list(GRANITE_H_TARGETS)
    if shape.startswith("nemotron"):
        return list(NEMOTRON_H_TARGETS)
    if shape.startswith("qwen3.5"):
        return TARGETS + LINEAR_TARGETS
    if shape.startswith("lfm2"):
        return list(LFM2_TARGETS)
    if shape.startswith("lfm3"):
        return list(LFM3_TARGETS)
    if shape.startswith(("glm-4.7-flash", "mistral-small-4")):
        return MLA_TARGETS + (TARGETS[4:] if EXPERT_LORA[0] else [])
    return TARGETS[:4] if shape in MOE_SHAPES and not EXPERT_LORA[0] else TARGETS


def hf_config(shape: str):
    from transformers import LlamaConfig

    if shape.startswith("gpt-oss"):
        from transformers import GptOssConfig

        return GptOssConfig(**MOE_SHAPES[shape])
    if shape.startswith("glm-4.7-flash"):
        from transformers import Glm4MoeLiteConfig

        return Glm4MoeLiteConfig(**MOE_SHAPES[shape])
    if shape.startswith("mistral-small-4"):
        from transformers import Mistral4Config

        return Mistral4Config(**MOE_SHAPES[shape])
    if shape.startswith("glm-4.5"):
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(**MOE_SHAPES[shape])
    if shape in MOE_SHAPES:
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**MOE_SHAPES[shape], max_position_embeddings=40960, rms_norm_eps=1e-6)
    if shape in OTHER_CONFIGS:
        import transformers

        return getattr(transformers, OTHER_CONFIGS[shape])(**SHAPES[shape])
    if shape.startswith("qwen2.5"):
        from transformers import Qwen2Config

        return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_parameters=dict(ROPE),
                       rope_scaling=dict(ROPE), rms_norm_eps=1e-5)


def _gc_mode(gc: str):
    return {"on": True, "off": False, "offload": "offload", "auto": "auto"}[gc]


def quantize_linears(model, quant: str = "nf4"):
    """What load_in_4bit (quant "nf4") / load_in_fp8 ("fp8") does on load, layer by layer: every Linear but the LM
    head in that format (and, for NF4, MoE's stacked experts), in place."""
    import torch

    from fasttune.quant.linear import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantLinear.from_linear(mod, quant))
            del mod
        elif quant == "nf4" and type(mod).__name__ in ("Experts", "GptOssExperts"):  # MoE: the experts in NF4 too
            from fasttune.quant.experts import QuantExpertWeight

            for attr in ("gate_up_proj", "down_proj"):
                mod.add_module(attr, QuantExpertWeight.quantize(mod._parameters.pop(attr).detach()))
    torch.cuda.empty_cache()


def build_ours(shape: str, gc: str, r: int, quant: str = "none"):
    import torch

    from fasttune.api import FastLanguageModel
    from fasttune.models.causal_lm import CausalLM

    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of the weights on the card
    with torch.device("cuda"):
        model = CausalLM(hf_config(shape))
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # transformers' init (normal, std = initializer_range) so both start from alike weights
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # matrices and stacked experts
                p.normal_(0.0, 0.02)
            elif name.endswith("A_log"):  # Qwen3.5's decay rates: log(uniform(0.01, 16)) as transformers starts them
                p.copy_(torch.empty(p.shape, device=p.device).uniform_(0.01, 16).log())
            elif name.endswith(("dt_bias", "router.scale", "router.per_expert_scale")):  # (Gemma 4's router: ones)
                p.fill_(1.0)
            elif "norm" not in name:  # biases, gpt-oss's sinks (built uninitialised): 0 as in HF (norms keep their
                # ones: Gemma 4's post_feedforward_layernorm_1 / _2 too)
                p.zero_()
    if quant in ("nf4", "fp8"):
        quantize_linears(model, quant)
    model.lora_settings = None
    if OFFLOAD_EMBEDDING[0]:  # what from_pretrained(..., offload_embedding=True) does after loading
        from fasttune.models.host_embedding import offload_input_embedding

        model.model.embed_tokens.weight.requires_grad_(False)  # loaded models come frozen
        offload_input_embedding(model)
    if OFFLOAD_LM_HEAD[0]:  # what from_pretrained(..., offload_lm_head=True) does after loading
        from fasttune.models.host_head import offload_lm_head

        model.lm_head.weight.requires_grad_(False)
        offload_lm_head(model)
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, target_modules=targets(shape),
                                             use_gradient_checkpointing=_gc_mode(gc))
    if RECOMPUTE_LAYERS[0] is not None:  # what use_gradient_checkpointing="auto" picks between the two modes
        model.recompute_layers = RECOMPUTE_LAYERS[0]
    model.lean_saves = LEAN_SAVES[0]  # what "auto" adds when memory is the limit (kernels/rebuild.py)
    return model


def _bnb_quantize(model):
    """transformers + bitsandbytes' QLoRA layers (Linear4bit, NF4, double quant, bf16 compute) in place of the
    decoder's Linears, quantised from the same random bf16 weights (from_config cannot quantise)."""
    import bitsandbytes as bnb
    import torch

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                  device="meta")
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if mod.bias is not None:  # Qwen2's q/k/v biases stay 16-bit, as bitsandbytes keeps them
                q.bias = torch.nn.Parameter(mod.bias.data.cpu(), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, q.to("cuda"))
    torch.cuda.empty_cache()


def build_hf(shape: str, gc: str, r: int, quant: str = "none"):
    import torch
    from peft import LoraConfig, get_peft_model
    import transformers

    with torch.device("cuda"):
        attn = "eager" if shape.startswith("gpt-oss") else "sdpa"  # GptOss has no SDPA attention in transformers
        if shape.startswith("mistral-small-4"):  # (transformers maps Mistral 4 under image-text-to-text only)
            model = transformers.Mistral4ForCausalLM._from_config(hf_config(shape), dtype=torch.bfloat16,
                                                                  attn_implementation=attn)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16,
                                                                  attn_implementation=attn)
    if quant == "nf4":
        _bnb_quantize(model)
    if gc != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if shape.startswith("gpt-oss") and EXPERT_LORA[0]:
        pattern = {r".*\.gate_up_proj": 2 * r}
        config = LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS[:4], target_parameters=GPT_OSS_EXPERTS,
                            rank_pattern=pattern, alpha_pattern=pattern, task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=r, lora_alpha=r, target_modules=targets(shape), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model


def run_one(impl: str, shape: str, gc: str, bs: int, seq: int, steps: int, warmup: int, r: int,
            quant: str = "none") -> dict:
    import torch

    torch.manual_seed(0)

    def cap():
        """A smaller card's memory: the allocator frees its cached blocks before failing."""
        torch.cuda.set_per_process_memory_fraction(MEMORY_CAP_GIB[0] * 2**30 / torch.cuda.mem_get_info()[1])
    # A quantised base is built here from random 16-bit weights on the GPU (the whole 16-bit model at once), which
    # from_pretrained never holds (it quantises tensor by tensor): its cap applies once the model is built.
    if MEMORY_CAP_GIB[0] and quant == "none":
        cap()
    if gc == "auto" and impl != "ours":
        raise SystemExit("--gc auto is fasttune's policy: use it with --impl ours")
    model = (build_ours if impl == "ours" else build_hf)(shape, gc, r, quant)
    if MEMORY_CAP_GIB[0] and quant != "none":
        torch.cuda.empty_cache()  # (the 16-bit weights' blocks back to the card, as a loaded model never had them)
        cap()
    auto_pick = None
    if gc == "auto":  # what SFTTrainer does at train start (train/loop.py), for this batch shape
        from fasttune.train.memory_policy import apply_pick, choose_checkpointing

        offload_ok = not (CUDA_GRAPHS[0] or NO_PARTIAL_OFFLOAD[0])  # (graphs cannot capture host copies)
        mode, auto_pick, recomputed, lean = choose_checkpointing(model, bs * seq, lean_ok=not NO_LEAN[0],
                                                                 offload_ok=offload_ok)
        apply_pick(model, mode, recomputed, lean)
        print(auto_pick, file=sys.stderr)
    torch.cuda.reset_peak_memory_stats()  # after building: the peak still holds the weights, not init transients
    model_gib = torch.cuda.memory_allocated() / 2**30  # weights and LoRA factors, before any step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)  # both sides: transformers' default
    g = torch.Generator(device="cuda").manual_seed(1)
    vocab = {**SHAPES, **MOE_SHAPES}[shape]["vocab_size"]
    batches = [torch.randint(0, vocab, (bs, seq), device="cuda", generator=g) for _ in range(2)]
    losses, norms = [], []
    graphs = None
    if impl == "ours" and CUDA_GRAPHS[0]:  # what SFTConfig(cuda_graphs=True) runs per micro-batch
        from fasttune.train.cuda_graphs import CudaGraphStep

        graphs = CudaGraphStep(model)

    def step(i):
        ids = batches[i % len(batches)]
        if graphs is not None:
            n = bs * (seq - 1)  # the targets of labels=ids, as the model counts them
            loss = graphs.run({"input_ids": ids, "labels": ids}, n, TOKEN_STATS[0]) / n
        else:
            loss = model(input_ids=ids, labels=ids, **TOKEN_STATS[0]).loss
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=graphs is None)
        losses.append(float(loss.detach()))

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert min(norms) > 0, f"grad norm was 0: {norms}"
    # A falling loss is asserted on real runs; the max-context probe (1-2 steps) only needs a finite one.
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    assert len(losses) < 4 or losses[-1] < losses[0], f"loss did not fall: {losses}"
    import transformers

    row = {"bench": "lora_sft", "impl": impl, "kernels": os.environ.get("FASTTUNE_KERNELS") or "default",
           "shape": shape, "quant": quant,
           "gradient_checkpointing": gc, "batch": bs, "seq": seq,
           "lora_r": r, "expert_lora": shape in MOE_SHAPES and EXPERT_LORA[0],
           "offload_embedding": impl == "ours" and OFFLOAD_EMBEDDING[0],
           "offload_lm_head": impl == "ours" and OFFLOAD_LM_HEAD[0],
           "cuda_graphs": graphs is not None and graphs.replays > 0, "steps": steps,
           "recompute_layers": getattr(model, "recompute_layers", None) if impl == "ours" else None,
           "lean_saves": impl == "ours" and bool(getattr(model, "lean_saves", False)), "auto_pick": auto_pick,
           "keep_block": KEEP_BLOCK[0] if impl == "ours" else None,
           "token_stats": bool(TOKEN_STATS[0].get("return_token_stats")),
           "label_smoothing": TOKEN_STATS[0].get("smoothing", 0.0),
           "tokens_per_second": round(bs * seq * steps / elapsed, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "model_gib": round(model_gib, 3),
           "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
           "memory_cap_gib": MEMORY_CAP_GIB[0], "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries"),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "loss_first": losses[0],
           "loss_last": losses[-1], "grad_norm_min": min(norms), "card": torch.cuda.get_device_name(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if impl == "ours" and os.environ.get("FASTTUNE_SSD"):  # the Mamba scan's chunks (kernels/ssd_chunk.py): "torch"
        row["ssd"] = os.environ["FASTTUNE_SSD"]  # takes the torch form, else the fused kernels (the default)
    if shape.startswith("qwen3.5"):  # both sides' delta rule: fla's kernels when installed, else torch
        try:
            import fla

            row["fla"] = fla.__version__
        except ImportError:
            row["fla"] = None
    if impl == "hf":
        import peft

        row["peft"] = peft.__version__
        if quant != "none":
            import bitsandbytes

            row["bitsandbytes"] = bitsandbytes.__version__
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", choices=sorted(MATRIX))
    ap.add_argument("--impl", choices=["ours", "hf"], default="ours")
    ap.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="llama-3.2-1b")
    ap.add_argument("--gc", choices=["on", "off", "offload", "auto"], default="on",
                    help="auto (ours): the trainer's pick for this batch and the free memory (see --memory-cap-gib)")
    ap.add_argument("--quant", choices=["none", "nf4", "fp8"], default="none")
    ap.add_argument("--max-context", action="store_true",
                    help="binary-search the longest bs-1 sequence that trains one step (in 1024-token steps)")
    ap.add_argument("--context-range", default="16384,524288")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--expert-lora", action="store_true",
                    help="MoE shapes: LoRA on the experts too (target_modules with gate/up/down), both impls")
    ap.add_argument("--offload-embedding", action="store_true",
                    help="ours: the frozen input embedding in pinned host memory (from_pretrained's offload_embedding)")
    ap.add_argument("--offload-lm-head", action="store_true",
                    help="ours: the frozen LM head in pinned host memory, streamed (from_pretrained's offload_lm_head)")
    ap.add_argument("--token-stats", action="store_true",
                    help="ours: the loss also returns TRL's SFT token metrics (what SFTTrainer asks for)")
    ap.add_argument("--label-smoothing", type=float, default=0.0,
                    help="ours: label smoothing in the chunked loss (SFTConfig.label_smoothing_factor)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="ours: replay forward+backward as CUDA graphs (cuda_graphs=True); with --matrix, each of our "
                         "rows without offload runs again with graphs")
    ap.add_argument("--lean-saves", action="store_true",
                    help="ours: layers that keep their activations rebuild norm and activation outputs in backward")
    ap.add_argument("--no-lean", action="store_true", help="--gc auto: pick without lean saves (the A/B)")
    ap.add_argument("--keep-block", choices=["auto", "always", "never"], default="auto",
                    help="ours with --gc offload: keep each recomputed layer's q/k/v and post-attention residual on "
                         "the host whatever block_pays says (models/kept_block.py), or never: the A/B of its cost model")
    ap.add_argument("--no-partial-offload", action="store_true",
                    help="--gc auto: pick without sending part of the layer inputs to the host (the A/B)")
    ap.add_argument("--recompute-layers", type=int, default=None,
                    help="ours with --gc on/offload: recompute only the first N layers (the rest keep their "
                         "activations), as use_gradient_checkpointing='auto' does when memory is between the modes")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="cap the process's GPU memory (torch.cuda.set_per_process_memory_fraction) as on a smaller "
                         "card: whether the step runs within it, and how often the allocator had to free its cache "
                         "(a quantised base: from after its build, which holds the 16-bit model from_pretrained never "
                         "holds)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_sft.jsonl"))
    a = ap.parse_args()
    RECOMPUTE_LAYERS[0] = a.recompute_layers
    LEAN_SAVES[0] = a.lean_saves
    KEEP_BLOCK[0] = a.keep_block
    if a.keep_block != "auto":  # the A/B of kept_block.block_pays (bench only: the product keeps its cost model)
        import fasttune.models.decoder as decoder

        decoder.block_pays = lambda *args, keep=a.keep_block == "always": keep
    NO_LEAN[0] = a.no_lean
    NO_PARTIAL_OFFLOAD[0] = a.no_partial_offload
    EXPERT_LORA[0] = a.expert_lora
    OFFLOAD_EMBEDDING[0] = a.offload_embedding
    OFFLOAD_LM_HEAD[0] = a.offload_lm_head
    CUDA_GRAPHS[0] = a.cuda_graphs
    MEMORY_CAP_GIB[0] = a.memory_cap_gib
    TOKEN_STATS[0] = {"return_token_stats": True} if a.token_stats and a.impl == "ours" else {}
    if a.label_smoothing and a.impl == "ours":
        TOKEN_STATS[0]["smoothing"] = a.label_smoothing
    if a.matrix:
        rows = []
        for impl, shape, gc, kernels, quant in MATRIX[a.matrix]:
            plain = impl == "hf" or gc == "offload" or not a.cuda_graphs
            for graphs in ([False] if plain else [False, True]):
                row = _subprocess_row(a, impl, shape, gc, kernels, quant, a.bs, a.seq, a.steps, a.warmup, a.out,
                                      graphs=graphs)
                if row is not None:
                    rows.append(row)
        print_table(rows)
        return
    if a.max_context:
        return max_context(a)
    row = run_one(a.impl, a.shape, a.gc, a.bs, a.seq, a.steps, a.warmup, a.r, a.quant)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def _subprocess_row(a, impl, shape, gc, kernels, quant, bs, seq, steps, warmup, out, quiet=False, graphs=False):
    """One configuration in a fresh process (clean peak memory); None when it failed (e.g. out of memory)."""
    env = dict(os.environ, FASTTUNE_KERNELS=kernels if kernels != "-" else "")
    cmd = [sys.executable, __file__, "--impl", impl, "--shape", shape, "--gc", gc, "--quant", quant,
           "--bs", str(bs), "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup), "--r", str(a.r),
           "--out", out] + (["--expert-lora"] if a.expert_lora else []) + \
        (["--offload-embedding"] if a.offload_embedding else []) + \
        (["--offload-lm-head"] if a.offload_lm_head else []) + (["--cuda-graphs"] if graphs and impl == "ours" else []) + \
        (["--recompute-layers", str(a.recompute_layers)] if a.recompute_layers is not None else []) + \
        (["--memory-cap-gib", str(a.memory_cap_gib)] if a.memory_cap_gib else []) + \
        (["--lean-saves"] if a.lean_saves else []) + (["--no-lean"] if a.no_lean else []) + \
        (["--no-partial-offload"] if a.no_partial_offload else [])
    return run_row(cmd, env, None if quiet else f"{impl} {shape} gc={gc} quant={quant} graphs={graphs}")


def run_row(cmd: list[str], env: dict | None, label: str | None) -> dict | None:
    """Run one benchmark row in its own process; its JSON row (the last stdout line), or None when it failed
    (the error printed under `label` unless label is None)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if label is not None:
            print(f"FAILED {label}:\n{proc.stderr[-3000:]}", flush=True)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def max_context(a):
    """Longest sequence (bs 1) for which one full optimizer step succeeds, to 1024 tokens; one process per try."""
    lo, hi = (int(x) for x in a.context_range.split(","))
    scratch = str(Path(a.out).with_suffix(".trials.jsonl"))
    best = None
    while hi - lo >= 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        row = _subprocess_row(a, a.impl, a.shape, a.gc, os.environ.get("FASTTUNE_KERNELS", "triton"), a.quant,
                              1, mid, 1, 0, scratch, quiet=True)
        print(f"seq {mid:,}: {'ok' if row else 'failed'}", flush=True)
        if row:
            lo, best = mid, row
        else:
            hi = mid
    if best is None:
        print("no length in the range trained")
        return
    best = dict(best, bench="max_context", note="bs 1, one optimizer step; longest passing length to 1024 tokens")
    with open(a.out, "a") as f:
        f.write(json.dumps(best) + "\n")
    print(json.dumps(best))


def print_table(rows):
    print(f"\n{'impl':<5} {'kernels':<8} {'shape':<13} {'quant':<5} {'gc':<7} {'graphs':<6} {'tok/s':>9} "
          f"{'peak GiB':>9} "
          f"{'vs hf':>6}  card")
    base = {(r["shape"], r.get("quant", "none")): r["tokens_per_second"] for r in rows if r["impl"] == "hf"}
    for r in rows:
        key = (r["shape"], r.get("quant", "none"))
        if key[1] == "fp8":  # transformers + PEFT has no FP8 training: against its bf16 row
            key = (r["shape"], "none")
        ratio = r["tokens_per_second"] / base[key] if key in base else float("nan")
        print(f"{r['impl']:<5} {r.get('kernels', '-'):<8} {r['shape']:<13} {r.get('quant', 'none'):<5} "
              f"{r['gradient_checkpointing']:<7} {str(r.get('cuda_graphs', False)):<6} "
              f"{r['tokens_per_second']:>9,.0f} {r['peak_gib']:>9.2f} {ratio:>6.2f}  "
              f"{r['card']}")


if __name__ == "__main__":
    main()
