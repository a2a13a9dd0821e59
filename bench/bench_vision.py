"""Vision-language LoRA training throughput and peak memory: fasttune vs transformers+PEFT, same GPU, same run (#22).

A vision-language model of a real shape (--shape: qwen2.5-vl-7b, the default; qwen3-vl-8b; gemma-3-4b) with
random-init weights (no downloads), built by transformers in bf16 on the GPU with the same seed on both sides (so
both start from the same weights). LoRA r16 on the language model's 7 projections only (the vision tower stays
frozen and has no adapters). Each row of the batch is text + one image's tokens + text, 2048 tokens in all, 256
image placeholders per row:
  qwen2.5-vl-7b: <|vision_start|> + 256 placeholders (one 448x448 image, grid (1, 32, 32) of 14-pixel patches) +
                 <|vision_end|>; pixel_values (2*1024, 3*2*14*14), image_grid_thw
  qwen3-vl-8b:   the same with one 512x512 image (grid (1, 32, 32) of 16-pixel patches, DeepStack at vision layers
                 8, 16, 24); pixel_values (2*1024, 3*2*16*16)
  gemma-3-4b:    "\\n\\n<start_of_image>" + 256 soft tokens + "<end_of_image>\\n\\n" (one 896x896 image, SigLIP
                 so400m, pooled to 256); pixel_values (2, 3, 896, 896)
  ministral-3-8b: 16 rows of 16 [IMG] each closed by [IMG_BREAK], the last by [IMG_END] (one 448x448 image, Pixtral
                 patches of 14 merged 2x2: 272 placeholders); pixel_values (2, 3, 448, 448), image_sizes
  gemma-4-ple:   <|image> + 280 soft tokens + <image|> (one 960x672 image: 60 x 42 patches of 16 pooled 3 x 3, the
                 processor's default budget); pixel_values (2, 2520, 768) with image_position_ids
  smolvlm-2.2b:  an image as Idefics3's processor cuts it, 2 x 2 crops and the whole image (5 tiles of 384x384,
                 SigLIP so400m/14, pixel-shuffled by 3: 81 tokens a tile), each tile's tokens after a fake token and
                 a crop mark; pixel_values (2, 5, 3, 384, 384) (transformers' layout, which ours takes too)
  internvl3.5-8b: an image as GotOcr2's processor cuts a large one, 4 crops and a thumbnail (5 patches of 448x448,
                 InternViT-300M, pixel-shuffled by 0.5: 256 tokens a patch) between <img> and </img>; pixel_values
                 (2 * 5, 3, 448, 448)
  llava-1.5-7b:  576 <image> tokens an image (one 336x336 image, CLIP ViT-L/14); pixel_values (2, 3, 336, 336)
  llama-3.2-11b-vision: one <|image|> token a row (a 1120x1120 image as 2 x 2 tiles of 560, MllamaVisionModel's 32
                 + 8 layers, 1,601 positions a tile); the text attends to the 6,404 image positions in the 8
                 cross-attention layers; pixel_values (2, 1, 4, 3, 560, 560) with aspect_ratio_ids / _mask and the
                 cross_attention_mask (image seen from its token on) given to both sides
Labels are the ids with the image placeholders masked; two such batches (ids and pixel values) are drawn once and
cycled, so the loss must fall. The hf rows pass the marks transformers' processors add (Qwen's mm_token_type_ids,
Gemma 3's token_type_ids: 1 on the image tokens) only when the model's forward has that parameter; the row's note
says which. AdamW (fused), lr 1e-3 (a shape's "lr" where it gives one), grad clipping 1.0, 3 untimed warm-up steps then 10 timed ones. Each row runs in
its own process for a clean peak-memory reading; every run asserts grad-norm > 0 and a finite, falling loss, then
appends a JSONL row (with the shape's name) to bench/results/vision_lora.jsonl. Usage on a GPU machine:

    python bench/bench_vision.py --matrix default        # qwen2.5-vl-7b: hf (recompute on), ours on, ours off
    python bench/bench_vision.py --matrix qwen3          # the same three rows, qwen3-vl-8b
    python bench/bench_vision.py --matrix gemma3         # the same three rows, gemma-3-4b
    python bench/bench_vision.py --matrix qwen3-moe      # the same three rows, qwen3-vl-30b-a3b (LoRA on the experts
                                                         # too, as target_parameters on both sides)
    python bench/bench_vision.py --matrix mistral3       # the same three rows, ministral-3-8b
    python bench/bench_vision.py --matrix gemma4         # the same three rows, gemma-4-ple
    python bench/bench_vision.py --matrix smolvlm        # the same three rows, smolvlm-2.2b
    python bench/bench_vision.py --matrix internvl       # the same three rows, internvl3.5-8b
    python bench/bench_vision.py --matrix llava          # the same three rows, llava-1.5-7b
    python bench/bench_vision.py --matrix mllama         # the same three rows, llama-3.2-11b-vision
    python bench/bench_vision.py --shape gemma-3-4b --impl ours --gc on     # a single row
    OMP_NUM_THREADS=1 python bench/bench_vision.py --matrix gemma3 --smoke --out /tmp/v.jsonl   # CPU check

tokens/s counts every position the language model runs (text + image placeholders): batch x seq per step.
--smoke runs a tiny shape of the same family on the CPU (tests/tiny_vision.py's: hidden 64, 2-3 layers, vision
depth 2, seq 128, one small image per row, 3 timed steps, plain AdamW, no CUDA memory statistics; a matrix's rows
in one process) to check that the script works; its rows say so.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# Real shapes from the checkpoints' config.json (max_position_embeddings cut to 32768 for the Qwen ones: enough for
# these batches). Per shape: `family` (fasttune.models.vision_families.FAMILIES), transformers' text / vision / top-level
# config, `before` / `after`: the token ids around an image's `image_token_id` placeholders, `text_ids`: random
# text ids are drawn from [0, text_ids) (below the special tokens), `image`: the square image's side in pixels,
# `prefix`: text tokens before the image; `text_low`: the lowest text id where the special tokens come first
# (Mistral's 1,000 control tokens); `tiny`: the --smoke shape of the same family (tests/tiny_vision.py's).
QWEN_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
# Qwen3-VL's SigLIP-2 tower (its out_hidden_size is the decoder's width) and text RoPE, shared by the 8B and 30B-A3B
QWEN3_VL_TOWER = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[8, 16, 24], in_channels=3)
QWEN3_VL_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                 "mrope_interleaved": True}
SHAPES = {
    # Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl", tiny="tiny-qwen2.5-vl",
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], in_channels=3),
        ids=dict(QWEN_VL_IDS, tie_word_embeddings=False),
        before=[151652], after=[151653], text_ids=151643, image=448, prefix=64),
    # Qwen3-VL-8B-Instruct: 512x512 -> grid (1, 32, 32) of 16-pixel patches -> 256 merged tokens
    "qwen3-vl-8b": dict(
        family="qwen3_vl", tiny="tiny-qwen3-vl",
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6,
                  rope_parameters=dict(QWEN3_VL_ROPE),
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision=dict(QWEN3_VL_TOWER, out_hidden_size=4096),
        ids=dict(QWEN_VL_IDS, tie_word_embeddings=False),
        before=[151652], after=[151653], text_ids=151643, image=512, prefix=64),
    # Qwen3-VL-30B-A3B-Instruct: Qwen3-VL's tower (out_hidden_size 2048) and a 48-layer MoE decoder (128 experts of
    # width 768, top 8, every layer sparse)
    "qwen3-vl-30b-a3b": dict(
        family="qwen3_vl_moe", tiny="tiny-qwen3-vl-moe",
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                  num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                  decoder_sparse_step=1, mlp_only_layers=[],
                  rope_parameters=dict(QWEN3_VL_ROPE),
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision=dict(QWEN3_VL_TOWER, out_hidden_size=2048),
        ids=dict(QWEN_VL_IDS, tie_word_embeddings=False),
        before=[151652], after=[151653], text_ids=151643, image=512, prefix=64),
    # gemma-3-4b-it: SigLIP so400m at 896x896 (64x64 patches of 14), pooled to 256 soft tokens; an image is
    # "\n\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\n\n" (108 is Gemma's "\n\n")
    "gemma-3-4b": dict(
        family="gemma3", tiny="tiny-gemma3",
        text=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=1024, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5
                  + ["sliding_attention"] * 4, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, vision_use_head=False),
        ids=dict(mm_tokens_per_image=256, boi_token_id=255999, eoi_token_id=256000, image_token_id=262144,
                 tie_word_embeddings=True),
        before=[108, 255999], after=[256000, 108], text_ids=255999, image=896, prefix=64),
    # Ministral-3-8B (transformers' Ministral3Config defaults and the release's Pixtral tower): a 448x448 image is
    # 32x32 patches of 14, merged 2x2 into 16 rows of 16 [IMG] (10), each row closed by [IMG_BREAK] (12), the last
    # by [IMG_END] (13)
    "ministral-3-8b": dict(
        family="mistral3", tiny="tiny-mistral3",
        text=dict(model_type="ministral3", vocab_size=131072, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=34, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=262144, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=11,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                   "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    head_dim=64, patch_size=14, image_size=1540, rope_theta=10000.0),
        ids=dict(image_token_index=10, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False),
        rows=(12, 13), before=[], after=[], text_low=1000, text_ids=131072, image=448, prefix=64),
    # Gemma 4 with per-layer embeddings: bench_lora.py's gemma-4-ple-30l text sizes (transformers' Gemma4TextConfig
    # defaults with the last 10 layers reusing keys and values: E2B / E4B's features, not a released size) before
    # transformers' default Gemma4VisionConfig tower (16 layers of 768); ids as Gemma4Config's defaults
    "gemma-4-ple": dict(
        family="gemma4", tiny="tiny-gemma4",
        text=dict(vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, global_head_dim=512,
                  hidden_size_per_layer_input=256, sliding_window=512, num_kv_shared_layers=10,
                  use_double_wide_mlp=True, use_bidirectional_attention="vision"),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                    patch_size=16, pooling_kernel_size=3),
        ids=dict(boi_token_id=255999, eoi_token_id=258882, image_token_id=258880, audio_config=None,
                 tie_word_embeddings=True),
        before=[255999], after=[258882], text_ids=255999, image=(960, 672), prefix=64,
        # this random model's loss barely moves on either side: at lr 1e-3 not at all in 13 steps (12.90 -> 12.92,
        # the hf row on the H200, 2026-12-03; bench_lora.py's text rows of these sizes fall by 0.01-0.04 only); at
        # 1e-2 by 0.01-0.03 (hf and ours with recompute), while ours without recompute ended 0.001 above its first
        # loss and wrote no row
        lr=1e-2),
    # SmolVLM-Instruct's sizes (Idefics3 layout, 2.2B): SmolLM2-1.7B's text model and SigLIP so400m/14 at 384
    # pixels, pixel-shuffled by 3 (81 tokens a tile); each row's image as the processor cuts a large one: 2 x 2
    # crops and the whole image, 5 tiles, each "<fake_token_around_image><row_r_col_c>" + 81 placeholders, then a
    # closing fake token (random text ids stand for the marks; the placeholder id is a stand-in above the text ids)
    "smolvlm-2.2b": dict(
        family="idefics3", tiny="tiny-idefics3",
        text=dict(model_type="llama", vocab_size=49280, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        ids=dict(image_token_id=49190, scale_factor=3, tie_word_embeddings=False),
        tiles=5, before=[], after=[], text_ids=49152, image=384, prefix=64),
    # InternVL3.5-8B's sizes (transformers' InternVLConfig, the "-hf" layout): Qwen3-8B's text model behind
    # InternViT-300M (24 layers of 1,024 at 448 pixels, patches of 14) and the pixel-shuffle MLP projector (ratio 0.5: 256 tokens a
    # patch); each row's image as GotOcr2's processor cuts a large one, 4 crops and a thumbnail (5 patches):
    # <img> + 1,280 <IMG_CONTEXT> + </img> (random text ids stand for the marks)
    "internvl3.5-8b": dict(
        family="internvl", tiny="tiny-internvl",
        text=dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                  num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                  pad_token_id=151643),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=[448, 448], patch_size=[14, 14]),
        ids=dict(image_token_id=151671, downsample_ratio=0.5, tie_word_embeddings=False),
        patches=5, before=[151669], after=[151670], text_ids=151643, image=448, prefix=64),
    # LLaVA-1.5-7B's sizes (transformers' LlavaConfig): Vicuna-7B's Llama text model behind CLIP ViT-L/14 at 336
    # pixels (24 layers of 1,024; features of the second-to-last layer without the class token: 576 an image) and the
    # two-layer MLP projector
    "llava-1.5-7b": dict(
        family="llava", tiny="tiny-llava",
        text=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        ids=dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                 tie_word_embeddings=False),
        fixed=576, before=[], after=[], text_ids=32000, image=336, prefix=64),
    # LLaVA-NeXT-Mistral-7B's sizes (transformers' LlavaNextConfig): Mistral-7B behind the same CLIP ViT-L/14-336
    # tower; a 336 x 336 image takes the 336 x 672 pinpoint (select_best_resolution), so 3 tiles (whole image + 1 x 2
    # grid) and 576 + 24 x 24 (the grid cut back to the square) + 24 newline features = 1,176 placeholders
    "llava-next-mistral-7b": dict(
        family="llava_next", tiny="tiny-llava-next",
        text=dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        ids=dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                 image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                 tie_word_embeddings=False),
        anyres=dict(tiles=3, pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        before=[], after=[], text_ids=32000, image=336, prefix=64),
    # Llama-3.2-11B-Vision's sizes (its config.json): Llama-3.1-8B's text layers with 8 cross-attention layers among
    # the 40, the embedding 8 rows past the vocabulary (<|image|> = 128256); the tower on 560-pixel tiles
    "llama-3.2-11b-vision": dict(
        family="mllama", tiny="tiny-mllama",
        text=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                  bos_token_id=128000, eos_token_id=128009, pad_token_id=128004),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                    attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4, vision_output_dim=7680,
                    intermediate_layers_indices=[3, 7, 15, 23, 30], norm_eps=1e-5,
                    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
        ids=dict(image_token_index=128256),
        cross=dict(tiles=4, ratio_id=6), before=[], after=[], text_ids=128000, image=560, prefix=64),
    # --smoke: tests/tiny_vision.py's shapes (hidden 64, 2-3 layers, a 2-block vision tower); the tiny byte-level
    # tokenizer's ids (0..255 bytes, 256 eos/pad, 259/260 image start/end, 261 image placeholder)
    "tiny-qwen2.5-vl": dict(
        family="qwen2_5_vl",
        text=dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                  bos_token_id=None, eos_token_id=256, pad_token_id=256),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                    in_channels=3),
        ids=dict(image_token_id=261, video_token_id=271, vision_start_token_id=259, vision_end_token_id=260,
                 tie_word_embeddings=False),
        before=[259], after=[260], text_ids=256, image=56, prefix=8),
    "tiny-qwen3-vl": dict(
        family="qwen3_vl",
        text=dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True},
                  bos_token_id=None, eos_token_id=256, pad_token_id=256),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 1], in_channels=3),
        ids=dict(image_token_id=261, video_token_id=271, vision_start_token_id=259, vision_end_token_id=260,
                 tie_word_embeddings=False),
        before=[259], after=[260], text_ids=256, image=64, prefix=8),
    "tiny-gemma3": dict(
        family="gemma3",
        text=dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512,
                  sliding_window=4, layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=256, pad_token_id=256),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                    patch_size=14),
        ids=dict(mm_tokens_per_image=4, boi_token_id=259, eoi_token_id=260, image_token_id=261,
                 tie_word_embeddings=True),
        before=[10, 10, 259], after=[260, 10, 10], text_ids=256, image=28, prefix=8),
}
SHAPES["tiny-mistral3"] = dict(
    family="mistral3",
    text=dict(model_type="ministral3", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=256, pad_token_id=256,
              rope_parameters=dict(SHAPES["ministral-3-8b"]["text"]["rope_parameters"],
                                   original_max_position_embeddings=16)),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                patch_size=8, image_size=64),
    ids=dict(image_token_index=261, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False),
    rows=(259, 260), before=[], after=[], text_ids=256, image=32, prefix=8)
SHAPES["tiny-gemma4"] = dict(
    family="gemma4",
    text=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=8,
              vocab_size_per_layer_input=300, sliding_window=4, num_kv_shared_layers=2,
              layer_types=["sliding_attention", "full_attention"] * 2, use_bidirectional_attention="vision",
              bos_token_id=None, eos_token_id=256, pad_token_id=256),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3),
    ids=dict(boi_token_id=259, eoi_token_id=260, image_token_id=261, audio_config=None, tie_word_embeddings=True),
    before=[259], after=[260], text_ids=256, image=(96, 48), prefix=8)
SHAPES["tiny-idefics3"] = dict(
    family="idefics3",
    text=dict(model_type="llama", vocab_size=304, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=256, pad_token_id=256),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                patch_size=14),
    ids=dict(image_token_id=260, scale_factor=2, tie_word_embeddings=False),
    tiles=5, before=[], after=[], text_ids=256, image=56, prefix=8)
SHAPES["tiny-internvl"] = dict(
    family="internvl",
    text=dict(model_type="qwen2", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=256, pad_token_id=256),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=[56, 56], patch_size=[14, 14]),
    ids=dict(image_token_id=261, downsample_ratio=0.5, tie_word_embeddings=False),
    patches=5, before=[259], after=[260], text_ids=256, image=56, prefix=8,
    lr=1e-2)  # (at 1e-3 its loss does not fall within the smoke run's 4 steps)
SHAPES["tiny-llava"] = dict(
    family="llava",
    text=dict(model_type="llama", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=256, pad_token_id=256),
    vision=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
    ids=dict(image_token_id=259, vision_feature_layer=-2, vision_feature_select_strategy="default",
             tie_word_embeddings=False),
    fixed=4, before=[], after=[], text_ids=256, image=28, prefix=8, lr=1e-2)
SHAPES["tiny-llava-next"] = dict(
    SHAPES["tiny-llava"], family="llava_next", fixed=None,
    ids=dict(image_token_id=259, vision_feature_layer=-2, vision_feature_select_strategy="default",
             image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], tie_word_embeddings=False),
    anyres=dict(tiles=3, pinpoints=[[28, 56], [56, 28], [56, 56]]))
SHAPES["tiny-mllama"] = dict(
    family="mllama",
    text=dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=257, eos_token_id=256, pad_token_id=256),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                image_size=28, patch_size=14, max_num_tiles=4, vision_output_dim=96, intermediate_layers_indices=[0, 1],
                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]]),
    ids=dict(image_token_index=259), cross=dict(tiles=4, ratio_id=7), before=[], after=[], text_ids=256, image=28,
    prefix=8, lr=1e-2)
# tiny Qwen3-VL with 4 experts of width 48, top 2, in every layer
SHAPES["tiny-qwen3-vl-moe"] = dict(SHAPES["tiny-qwen3-vl"], family="qwen3_vl_moe", text=dict(
    SHAPES["tiny-qwen3-vl"]["text"], moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[]))
REAL_SHAPES = [k for k, v in SHAPES.items() if "tiny" in v]
# The language model's 7 projections, as PEFT matches module names of transformers' Qwen2.5-VL / Qwen3-VL / Gemma 3
# (fullmatch): the vision towers' blocks have gate/up/down_proj (Qwen2.5-VL) or q/k/v_proj (SigLIP) too, which
# this leaves out.
HF_TARGETS = (r"model\.{language}\.layers\.\d+\."
              r"((self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
# matrix -> (shape, rows of (impl, gradient checkpointing, FASTTUNE_KERNELS for ours))
ROWS = [("hf", "on", "-"), ("ours", "on", "triton"), ("ours", "off", "triton")]
MATRIX = {"default": ("qwen2.5-vl-7b", ROWS), "qwen3": ("qwen3-vl-8b", ROWS), "gemma3": ("gemma-3-4b", ROWS),
          "qwen3-moe": ("qwen3-vl-30b-a3b", ROWS), "mistral3": ("ministral-3-8b", ROWS),
          "gemma4": ("gemma-4-ple", ROWS), "smolvlm": ("smolvlm-2.2b", ROWS), "internvl": ("internvl3.5-8b", ROWS),
          "llava": ("llava-1.5-7b", ROWS), "llava-next": ("llava-next-mistral-7b", ROWS),
          "mllama": ("llama-3.2-11b-vision", ROWS)}
# Qwen3-VL-MoE: the MLP projections are stacked expert weights, which LoRA adapts as PEFT's target_parameters (ours
# picks the same two from its layer-group switches)
MOE_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def hf_config(shape: str):
    import transformers

    s = SHAPES[shape]
    cls = {"qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig", "gemma3": "Gemma3Config",
           "qwen3_vl_moe": "Qwen3VLMoeConfig", "mistral3": "Mistral3Config", "gemma4": "Gemma4Config",
           "idefics3": "Idefics3Config", "internvl": "InternVLConfig", "llava": "LlavaConfig",
           "llava_next": "LlavaNextConfig", "mllama": "MllamaConfig"}[s["family"]]
    return getattr(transformers, cls)(text_config=dict(s["text"]), vision_config=dict(s["vision"]), **s["ids"])


def build_transformers(shape: str, device: str):
    """transformers' model of the shape's family in bf16 on `device`, every matrix (and the patch conv, and Gemma 3's
    projection, which transformers initialises to zeros) drawn from normal(0, 0.02) in a fixed order: with the same
    seed, the hf and ours rows start from the same weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_config(shape), dtype=torch.bfloat16,
                                                        attn_implementation="sdpa")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def build_ours(shape: str, gc_mode: str, r: int, device: str):
    import torch

    from fasttune.api import FastModel
    from fasttune.models.loading import vision_model_from_hf

    hf = build_transformers(shape, device)
    # Same device and dtype: our decoder takes the language model's tensors as they are (no copy), and the vision
    # tower is transformers' module itself.
    model = vision_model_from_hf(hf, torch.bfloat16, torch.device(device), f"random {shape}")
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model.lora_settings = None
    model = FastModel.get_peft_model(model, r=r, lora_alpha=r, finetune_vision_layers=False,
                                     use_gradient_checkpointing={"on": True, "off": False}[gc_mode])
    if SHAPES[shape]["family"] == "gemma3":
        note = ("two-way image attention: our image_blocks inside forward; vision tower and projector: "
                "transformers' modules, frozen")
    elif SHAPES[shape]["family"] == "mistral3":
        note = "Pixtral tower and patch-merging projector: transformers' modules, frozen"
    elif SHAPES[shape]["family"] == "gemma4":
        note = ("two-way attention within the image in the sliding layers: our image_blocks inside forward; vision "
                "tower and embedder: transformers' modules, frozen")
    elif SHAPES[shape]["family"] == "idefics3":
        note = "tiles through transformers' tower and pixel-shuffle connector, frozen"
    elif SHAPES[shape]["family"] == "llava":
        note = "CLIP tower (second-to-last layer) and projector: transformers' modules, frozen"
    elif SHAPES[shape]["family"] == "llava_next":
        note = ("whole-image tile + grid of tiles through transformers' CLIP tower and projector, frozen; our grid "
                "unpad and image_newline")
    elif SHAPES[shape]["family"] == "internvl":
        note = "patches through transformers' InternViT and projector (our pixel shuffle), frozen"
    elif SHAPES[shape]["family"] == "mllama":
        note = ("tiles through transformers' MllamaVisionModel and projector, frozen; our cross-attention layers "
                "(LoRA on their q/k/v/o too, as on hf's side)")
    else:
        note = "positions: our qwen_vl_positions inside forward; vision tower: transformers' module, frozen"
    return model, note


def build_hf(shape: str, gc_mode: str, r: int, device: str):
    from peft import LoraConfig, get_peft_model

    model = build_transformers(shape, device)
    model.config.use_cache = False
    hooks = 0
    if gc_mode == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        hooks = len(getattr(model, "_require_grads_hooks", [None]))
    moe = SHAPES[shape]["family"] == "qwen3_vl_moe"
    language = "text_model" if SHAPES[shape]["family"] == "idefics3" else "language_model"
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=HF_TARGETS.format(language=language),
                                             task_type="CAUSAL_LM",
                                             target_parameters=MOE_TARGET_PARAMETERS if moe else None))
    model.train()
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    n_layers = SHAPES[shape]["text"]["num_hidden_layers"]
    # MoE: 4 attention projections and one wrapper per layer holding both expert LoRAs (PEFT's nesting)
    per_layer = 4 + len(MOE_TARGET_PARAMETERS) if moe else 7
    assert all(f".{language}." in n for n in adapted), sorted(adapted)[:8]
    shared = SHAPES[shape]["text"].get("num_kv_shared_layers", 0)  # (Gemma 4's layers that reuse keys and values
    # have no k_proj / v_proj)
    n_lora = len({n for n, _ in model.named_parameters() if ".lora_A." in n})
    assert n_lora in (per_layer * n_layers, per_layer * n_layers - 2 * shared), (n_lora, sorted(adapted)[:8])
    # transformers 5.24 hooks Qwen2.5-VL's and Gemma 3's vision patch embedding as well as the token embeddings (2
    # hooks), so their backward also runs through the frozen vision tower; Qwen3-VL's token embeddings only give 1.
    note = f"enable_input_require_grads hooked {hooks} embedding layer(s)" if gc_mode == "on" else ""
    return model, note


def make_batches(shape: str, bs: int, seq: int, device: str, n: int = 2):
    """n batches of bs rows: prefix text, the shape's `before` ids, the image's placeholders, its `after` ids, text
    up to seq; one square image per row, pixel values random normal bf16: Qwen: patches (bs * patches,
    3*2*P*P) with image_grid_thw; Gemma 3: images (bs, 3, S, S); Gemma 4: one (width, height) image's patches
    (bs, patches, P*P*3) in [0, 1) with image_position_ids (bs, patches, 2)."""
    import torch

    s = SHAPES[shape]
    v, ids = s["vision"], s["ids"]
    if s["family"] == "gemma4":
        return _gemma4_batches(s, bs, seq, device, n)
    patch = v["patch_size"] if isinstance(v["patch_size"], int) else v["patch_size"][0]  # (InternVL: [14, 14])
    grid = s["image"] // patch
    patches = grid * grid  # temporal 1 (Qwen): the image is repeated over temporal_patch_size frames
    rows = s.get("rows")  # Mistral 3: rows of image tokens, each closed by a break (the last by an end) token
    if s.get("cross"):  # Llama 3.2 Vision: one <|image|> token; the image's tiles reach the text by cross-attention
        placeholders = 1
    elif s.get("fixed"):  # LLaVA: a fixed number of tokens an image
        placeholders = s["fixed"]
    elif s.get("anyres"):  # LLaVA-NeXT: the square image's count for the pinpoint transformers picks
        from fasttune.data.vision_layouts import anyres_token_count

        placeholders = anyres_token_count(s["image"], s["image"], s["anyres"]["pinpoints"], s["image"], patch)
    elif s.get("patches"):  # InternVL: the image's patches' tokens between the shape's before / after ids
        placeholders = s["patches"] * round(patches * ids["downsample_ratio"] ** 2)
    elif s.get("tiles"):  # Idefics3: per tile a fake token, a crop mark and its tokens; a closing fake token
        per_tile = patches // ids["scale_factor"] ** 2
        fake, mark = s["text_ids"] - 1, s["text_ids"] - 2
        block = torch.tensor(([fake, mark] + [ids["image_token_id"]] * per_tile) * s["tiles"] + [fake], device=device)
        placeholders = len(block)
    elif s["family"] == "gemma3":
        placeholders = ids["mm_tokens_per_image"]
    elif rows:
        side = grid // ids["spatial_merge_size"]
        image_id = ids["image_token_index"]
        block = torch.tensor(([image_id] * side + [rows[0]]) * side, device=device)
        block[-1] = rows[1]
        placeholders = len(block)
    else:
        placeholders = patches // v["spatial_merge_size"] ** 2
        patch_dim = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    prefix, before, after = s["prefix"], s["before"], s["after"]
    start = prefix + len(before)
    suffix = seq - start - placeholders - len(after)
    assert suffix > 0, f"seq {seq} is too short for {placeholders} image tokens"
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for _ in range(n):
        input_ids = torch.randint(s.get("text_low", 0), s["text_ids"], (bs, seq), device=device, generator=g)
        input_ids[:, prefix:start] = torch.tensor(before, device=device)
        image_id = ids.get("image_token_id", ids.get("image_token_index"))  # (MllamaConfig: image_token_index)
        input_ids[:, start:start + placeholders] = block if rows or s.get("tiles") else image_id
        input_ids[:, start + placeholders:start + placeholders + len(after)] = torch.tensor(after, device=device)
        labels = input_ids.clone()
        labels[:, start:start + placeholders] = -100
        batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        if s.get("cross"):  # (rows, images, tiles, C, H, W); the image seen from its token on
            tiles = s["cross"]["tiles"]
            batch["pixel_values"] = torch.randn(bs, 1, tiles, 3, s["image"], s["image"], device=device,
                                                generator=g).to(torch.bfloat16)
            batch["aspect_ratio_ids"] = torch.full((bs, 1), s["cross"]["ratio_id"], device=device)
            batch["aspect_ratio_mask"] = torch.ones(bs, 1, tiles, dtype=torch.long, device=device)
            seen = torch.zeros(bs, seq, 1, tiles, dtype=torch.long, device=device)
            seen[:, start:] = 1
            batch["cross_attention_mask"] = seen
        elif s.get("patches"):  # (rows x patches, C, H, W), as GotOcr2's processor gives them
            batch["pixel_values"] = torch.randn(bs * s["patches"], 3, s["image"], s["image"], device=device,
                                                generator=g).to(torch.bfloat16)
        elif s.get("anyres"):  # (images, tiles, C, H, W) with each image's (height, width)
            batch["pixel_values"] = torch.randn(bs, s["anyres"]["tiles"], 3, s["image"], s["image"], device=device,
                                                generator=g).to(torch.bfloat16)
            batch["image_sizes"] = torch.tensor([[s["image"], s["image"]]] * bs, device=device)
        elif s.get("tiles"):  # transformers' layout (rows, images, C, H, W), which ours takes too
            batch["pixel_values"] = torch.randn(bs, s["tiles"], 3, s["image"], s["image"], device=device,
                                                generator=g).to(torch.bfloat16)
        elif rows:
            batch["pixel_values"] = torch.randn(bs, 3, s["image"], s["image"], device=device,
                                                generator=g).to(torch.bfloat16)
            batch["image_sizes"] = torch.tensor([[s["image"], s["image"]]] * bs, device=device)
        elif s["family"] in ("gemma3", "llava"):
            batch["pixel_values"] = torch.randn(bs, 3, s["image"], s["image"], device=device,
                                                generator=g).to(torch.bfloat16)
        else:
            batch["pixel_values"] = torch.randn(bs * patches, patch_dim, device=device, generator=g).to(torch.bfloat16)
            batch["image_grid_thw"] = torch.tensor([[1, grid, grid]] * bs, device=device)
        out.append(batch)
    return out, placeholders


def _gemma4_batches(s: dict, bs: int, seq: int, device: str, n: int):
    """make_batches for Gemma 4: each image's (x, y) patch grid pooled pool x pool into soft tokens."""
    import torch

    v = s["vision"]
    cols, rows = (side // v["patch_size"] for side in s["image"])
    placeholders = (cols // v["pooling_kernel_size"]) * (rows // v["pooling_kernel_size"])
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None].expand(bs, -1, -1).contiguous()
    start = s["prefix"] + len(s["before"])
    assert seq - start - placeholders - len(s["after"]) > 0, f"seq {seq} is too short for {placeholders} image tokens"
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for _ in range(n):
        input_ids = torch.randint(0, s["text_ids"], (bs, seq), device=device, generator=g)
        input_ids[:, s["prefix"]:start] = torch.tensor(s["before"], device=device)
        input_ids[:, start:start + placeholders] = s["ids"]["image_token_id"]
        input_ids[:, start + placeholders:start + placeholders + len(s["after"])] = torch.tensor(s["after"],
                                                                                                device=device)
        labels = input_ids.clone()
        labels[:, start:start + placeholders] = -100
        pixels = torch.rand(bs, rows * cols, 3 * v["patch_size"] ** 2, device=device, generator=g)
        out.append(dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                        pixel_values=pixels.to(torch.bfloat16), image_position_ids=positions))
    return out, placeholders


def hf_forward_kwargs(model, shape: str) -> tuple[dict, str]:
    """The image-token marks transformers' processors add, passed only when the model's forward has the
    parameter: Qwen's mm_token_type_ids (1 = image token; transformers 5.24 builds the multimodal RoPE positions
    from it and uses plain positions without it; a forward without the parameter finds the image tokens by id
    itself), Gemma 3's token_type_ids (1 = image token: its two-way image attention in training). Returns (a
    function of the batch giving the extra kwargs, the note saying which)."""
    if SHAPES[shape]["family"] == "mllama":
        return (lambda b: {"use_cache": False}), "cross_attention_mask in the batch (both sides)"
    if SHAPES[shape]["family"] in ("mistral3", "idefics3", "internvl", "llava", "llava_next"):
        return (lambda b: {"use_cache": False}), "no marks (the model finds its image tokens by id)"
    name = "token_type_ids" if SHAPES[shape]["family"] == "gemma3" else "mm_token_type_ids"
    image_id = SHAPES[shape]["ids"]["image_token_id"]
    cls = type(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if name in inspect.signature(cls.forward).parameters:
        return (lambda b: {name: (b["input_ids"] == image_id).int(), "use_cache": False},
                f"{name} passed (forward has the parameter)")
    if name == "token_type_ids":
        return (lambda b: {"use_cache": False},
                "no token_type_ids parameter: not passed (the image tokens attend causally)")
    return (lambda b: {"use_cache": False},
            "no mm_token_type_ids parameter: transformers computed the multimodal positions itself")


def run_one(impl: str, gc_mode: str, bs: int, seq: int, steps: int, warmup: int, r: int, smoke: bool,
            shape: str = "qwen2.5-vl-7b") -> dict:
    import torch

    shape = SHAPES[shape]["tiny"] if smoke else shape
    device = "cpu" if smoke else "cuda"
    if not smoke:
        assert torch.cuda.is_available(), "bench_vision.py needs a CUDA GPU (or --smoke for a CPU check)"
    torch.manual_seed(0)
    model, note = (build_ours if impl == "ours" else build_hf)(shape, gc_mode, r, device)
    extra, how = (lambda b: {}), ""
    if impl == "hf":
        extra, how = hf_forward_kwargs(model, shape)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # after building: the peak holds the weights, not init transients
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "no trainable parameters"
    lr = SHAPES[shape].get("lr", 1e-3)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device == "cuda")
    batches, placeholders = make_batches(shape, bs, seq, device)
    losses, norms = [], []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step(i):
        b = batches[i % len(batches)]
        out = model(**b, **extra(b))
        out.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))

    for i in range(warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    assert min(norms) > 0 and all(math.isfinite(v) for v in norms), f"grad norm 0 or not finite: {norms}"
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    # the batches alternate: compare the last step on batch 0 with the first, and the last step with the first
    last_same = losses[(len(losses) - 1) // 2 * 2]
    assert len(losses) >= 3 and last_same < losses[0] and losses[-1] < losses[0], f"loss did not fall: {losses}"
    import peft
    import transformers

    row = {"bench": "vision_lora", "impl": impl,
           "kernels": (os.environ.get("FASTTUNE_KERNELS") or "default") if impl == "ours" else "-",
           "shape": shape, "gradient_checkpointing": gc_mode, "batch": bs, "seq": seq,
           "images_per_row": 1, "image_tokens_per_row": placeholders,
           "image_size": SHAPES[shape]["image"], "lora_r": r, "lr": lr, "warmup": warmup, "steps": steps,
           "tokens_per_second": round(bs * seq * steps / elapsed, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
           "losses": [round(v, 4) for v in losses], "loss_first": losses[0], "loss_last": losses[-1],
           "grad_norm_min": min(norms),
           "card": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "note": "; ".join(x for x in (how, note) if x) + ("; SMOKE (tiny shape, CPU)" if smoke else ""),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", choices=sorted(MATRIX), help="default: qwen2.5-vl-7b; qwen3: qwen3-vl-8b; "
                    "gemma3: gemma-3-4b (hf recompute on, ours on, ours off)")
    ap.add_argument("--shape", choices=REAL_SHAPES, default=None,
                    help="model shape (default qwen2.5-vl-7b, or the --matrix's); --smoke runs a tiny one of its "
                    "family")
    ap.add_argument("--impl", choices=["ours", "hf"], default="ours")
    ap.add_argument("--gc", choices=["on", "off"], default="on")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; 128 with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --smoke)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script, not the speed")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_lora.jsonl"))
    a = ap.parse_args()
    a.seq = a.seq or (128 if a.smoke else 2048)
    a.steps = a.steps or (3 if a.smoke else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    if a.smoke and Path(a.out).resolve().parent == (Path(__file__).parent / "results").resolve():
        sys.exit("--smoke rows are not results: pass --out to a file outside bench/results/ (e.g. /tmp/v.jsonl)")
    if a.matrix:
        shape, matrix = MATRIX[a.matrix]
        if a.shape not in (None, shape):
            sys.exit(f"--matrix {a.matrix} runs the {shape} shape; leave --shape out (or pass --shape {shape})")
        rows = []
        for impl, gc_mode, kernels in matrix:
            if a.smoke and kernels != "-":
                kernels = "torch"  # what runs on a CPU anyway (no Triton there)
            env = dict(os.environ, FASTTUNE_KERNELS=kernels if kernels != "-" else "")
            label = f"{impl} gc={gc_mode} kernels={kernels}"
            if a.smoke:  # no peak memory to keep apart on a CPU: one process, imports paid once
                rows += [r for r in [smoke_row(a, shape, impl, gc_mode, env, label)] if r is not None]
                continue
            cmd = [sys.executable, __file__, "--shape", shape, "--impl", impl, "--gc", gc_mode, "--bs", str(a.bs),
                   "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--r", str(a.r),
                   "--out", a.out]
            row = run_row(cmd, env, label)
            if row is not None:
                rows.append(row)
        print_table(rows)
        if len(rows) < len(matrix):
            sys.exit(1)
        return
    row = run_one(a.impl, a.gc, a.bs, a.seq, a.steps, a.warmup, a.r, a.smoke, a.shape or "qwen2.5-vl-7b")
    append_row(a.out, row)
    print(json.dumps(row))


def append_row(out: str, row: dict):
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def smoke_row(a, shape: str, impl: str, gc_mode: str, env: dict, label: str) -> dict | None:
    """A --smoke matrix row in this process (FASTTUNE_KERNELS is read at call time); its row, appended to a.out,
    or None when it failed, the error printed under `label`."""
    import traceback

    os.environ["FASTTUNE_KERNELS"] = env["FASTTUNE_KERNELS"]
    try:
        row = run_one(impl, gc_mode, a.bs, a.seq, a.steps, a.warmup, a.r, True, shape)
    except Exception:
        print(f"FAILED {label}:\n{traceback.format_exc()[-3000:]}", flush=True)
        return None
    finally:
        gc.collect()
    append_row(a.out, row)
    print(json.dumps(row), flush=True)
    return row


def run_row(cmd: list[str], env: dict, label: str) -> dict | None:
    """One row in its own process (clean peak memory); its JSON row (the last stdout line), or None when it failed
    (e.g. out of memory), the error printed under `label`."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"FAILED {label}:\n{proc.stderr[-3000:]}", flush=True)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def print_table(rows):
    print(f"\n{'impl':<5} {'kernels':<8} {'shape':<16} {'gc':<4} {'tok/s':>9} {'peak GiB':>9} {'vs hf':>6} "
          f"{'loss first -> last':>20}  card")
    base = next((r for r in rows if r["impl"] == "hf"), None)
    for r in rows:
        ratio = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        print(f"{r['impl']:<5} {r['kernels']:<8} {r['shape']:<16} {r['gradient_checkpointing']:<4} "
              f"{r['tokens_per_second']:>9,.0f} {peak:>9} {ratio:>6.2f} {loss:>20}  {r['card']}")
    if base:  # same seed, same weights, LoRA B = 0: the first losses should agree
        for r in rows:
            if r is not base and abs(r["loss_first"] - base["loss_first"]) > 0.02 * abs(base["loss_first"]):
                print(f"WARNING: first loss {r['impl']} gc={r['gradient_checkpointing']} {r['loss_first']:.4f} vs "
                      f"hf {base['loss_first']:.4f}: the two start from the same weights and should agree")
    for r in rows:
        if r["note"]:
            print(f"note ({r['impl']} gc={r['gradient_checkpointing']}): {r['note']}")


if __name__ == "__main__":
    main()
