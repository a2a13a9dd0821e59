"""Packing vs padding through the real trainer, on a length-skewed dataset (lengths 32..2048).

Random-init weights of the Llama-3.2-1B shape (or `--shape tiny` on a CPU), LoRA r16, pre-tokenized random rows
(so no tokenizer or hub is needed), the same rows and step count for both runs. `--vision qwen2.5-vl-7b` (a
bench_vision.py shape; `tiny-qwen2.5-vl` on a CPU) packs image + text conversations instead: each row one noise
image of `--image` pixels and an answer of 32..`--max-len` bytes, through a byte-level tokenizer (tests/'s tiny
one, whose vision token ids the model's config takes) and transformers' Qwen2-VL image processor. Reports real (non-pad) tokens
per second and peak memory, asserts a falling loss and grad-norm > 0, and appends JSONL rows to
bench/results/packing.jsonl. Usage on a GPU machine:

    python bench/bench_packing.py
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import SHAPES, hf_config  # noqa: E402

SHAPES = dict(SHAPES, tiny=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def random_decoder(cfg, device: str, dtype):
    """A CausalLM of transformers config `cfg` on `device` in `dtype`, seeded 0: matrices normal(0, 0.02), norms 1."""
    import torch

    from fasttune.models.causal_lm import CausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def build(shape: str, device: str, quant: str = "none"):
    """A random-init CausalLM of `shape` on `device` (bf16 on CUDA) with LoRA r16; quant "nf4" / "fp8": its decoder
    Linears quantised first (bench_lora.quantize_linears)."""
    import torch

    from fasttune.api import FastLanguageModel

    cfg = hf_config(shape) if shape != "tiny" else None
    if cfg is None:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**SHAPES["tiny"], max_position_embeddings=4096)
    model = random_decoder(cfg, device, torch.bfloat16 if device == "cuda" else torch.float32)
    if quant != "none":
        from bench_lora import quantize_linears

        quantize_linears(model, quant)
    model.lora_settings, model.name_or_path, model.max_seq_length = None, shape, 4096
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)


def rows(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    # Length-skewed: most rows short, a few long (log-uniform between lo and hi).
    lengths = [int(lo * (hi / lo) ** rng.random()) for _ in range(n)]
    # A learnable stream (a fixed successor rule over 64 token ids), so the loss must fall within a few steps.
    ids = rng.sample(range(1, vocab), 64)
    nxt = {a: ids[(i * 7 + 3) % 64] for i, a in enumerate(ids)}
    out = []
    for k in lengths:
        seq = [rng.choice(ids)]
        while len(seq) < k:
            seq.append(nxt[seq[-1]])
        out.append({"input_ids": seq})
    return out


VISION_IDS = dict(image_token_id=261, video_token_id=262, vision_start_token_id=259, vision_end_token_id=260)


def vision_processor():
    """A VisionProcessor of tests/'s byte-level tokenizer (its vision tokens 259-262) and transformers' Qwen2-VL image
    processor (14-pixel patches, 2 x 2 merged), up to 1,024 x 1,024 pixels."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from tiny_tokenizer import make_tiny_tokenizer
    from tiny_vision import QWEN_VL_TEMPLATE, VISION_TOKENS
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fasttune.data.vision import VisionProcessor

    tok = make_tiny_tokenizer(chat_template=QWEN_VL_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS + ["<|video_pad|>"]})
    images = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28,
                                      max_pixels=1024 * 1024)
    return VisionProcessor(tok, images, QWEN_VL_TEMPLATE, "<|image_pad|>", 2)


def build_vision(shape: str, device: str):
    """bench_vision.py's model of `shape` (LoRA r16 on the language model, recompute on) with the tiny tokenizer's
    vision token ids."""
    import bench_vision

    bench_vision.SHAPES[shape] = dict(bench_vision.SHAPES[shape], ids=dict(bench_vision.SHAPES[shape]["ids"],
                                                                          **VISION_IDS))
    model, _ = bench_vision.build_ours(shape, "on", 16, device)
    model.name_or_path, model.max_seq_length = shape, 4096
    return model


def vision_rows(n: int, lo: int, hi: int, side: int, seed: int = 0) -> list[dict]:
    """n conversations: a noise image of side x side pixels and a question, then an answer of a learnable pattern,
    lo..hi bytes long (log-uniform)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = int(lo * (hi / lo) ** rng.random())
        pixels = np.random.default_rng(seed + i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        answer = ("the cat sat on the mat. " * (k // 24 + 1))[:k]
        out.append({"messages": [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                                              {"type": "text", "text": "describe it"}]},
                                 {"role": "assistant", "content": answer}]})
    return out


def run(shape: str, device: str, packing: bool, data: list[dict], steps: int, seq: int, bs: int,
        vision: bool = False) -> dict:
    import torch

    from fasttune import SFTConfig, SFTTrainer

    model = build_vision(shape, device) if vision else build(shape, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, packing=packing, max_seq_length=seq, max_steps=steps, learning_rate=1e-3,
                         per_device_train_batch_size=bs, gradient_accumulation_steps=1, logging_steps=1,
                         lr_scheduler_type="constant", report_to="none", save_strategy="no",
                         bf16=device == "cuda")
        trainer = SFTTrainer(model=model, tokenizer=vision_processor() if vision else None, train_dataset=data,
                             args=args)
        metrics = trainer.train()
    losses = [h["loss"] for h in trainer.log_history]
    norms = [h["grad_norm"] for h in trainer.log_history]
    assert min(norms) > 0 and losses[-1] < losses[0], (losses, norms)
    import transformers

    return {"bench": "packing", "packing": packing, "shape": shape, "vision": vision, "seq": seq, "batch": bs,
            "steps": steps,
            "rows": len(data), "real_tokens_per_second": round(metrics["train_tokens_per_second"], 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
            "loss_first": losses[0], "loss_last": losses[-1],
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "kernels": os.environ.get("FASTTUNE_KERNELS") or "default",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vision", default=None, help="a bench_vision.py shape (image + text rows) instead of --shape")
    ap.add_argument("--image", type=int, default=448, help="--vision: image side in pixels")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.jsonl"))
    a = ap.parse_args()
    vision = a.vision is not None
    shape = a.vision or a.shape
    data = vision_rows(a.rows, a.min_len, a.max_len, a.image) if vision else \
        rows(a.rows, SHAPES[a.shape]["vocab_size"], a.min_len, a.max_len)
    for packing in (False, True):  # warm-up: Triton compiles and cuBLAS picks kernels outside the timed runs
        run(shape, a.device, packing, data, 3, a.seq, a.bs, vision)
    results = []
    for packing in (False, True):
        row = run(shape, a.device, packing, data, a.steps, a.seq, a.bs, vision)
        results.append(row)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    base = results[0]["real_tokens_per_second"]
    print(f"\n{'packing':<8} {'real tok/s':>11} {'peak GiB':>9} {'vs padded':>9}  card")
    for r in results:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{str(r['packing']):<8} {r['real_tokens_per_second']:>11,.0f} {peak:>9} "
              f"{r['real_tokens_per_second'] / base:>9.2f}  {r['card']}")


if __name__ == "__main__":
    main()
