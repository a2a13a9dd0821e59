"""Packing vs padding through the real trainer, on a length-skewed dataset (lengths 32..2048).

Random-init weights of the Llama-3.2-1B shape (or `--shape tiny` on a CPU), LoRA r16, pre-tokenized random rows
(so no tokenizer or hub is needed), the same rows and step count for both runs. Reports real (non-pad) tokens
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


def build(shape: str, device: str):
    import torch

    from fasttune.api import FastLanguageModel
    from fasttune.models.causal_lm import CausalLM

    cfg = hf_config(shape) if shape != "tiny" else None
    if cfg is None:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**SHAPES["tiny"], max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
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


def run(shape: str, device: str, packing: bool, data: list[dict], steps: int, seq: int, bs: int) -> dict:
    import torch

    from fasttune import SFTConfig, SFTTrainer

    model = build(shape, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, packing=packing, max_seq_length=seq, max_steps=steps, learning_rate=1e-3,
                         per_device_train_batch_size=bs, gradient_accumulation_steps=1, logging_steps=1,
                         lr_scheduler_type="constant")
        trainer = SFTTrainer(model=model, tokenizer=None, train_dataset=data, args=args)
        metrics = trainer.train()
    losses = [h["loss"] for h in trainer.log_history]
    norms = [h["grad_norm"] for h in trainer.log_history]
    assert min(norms) > 0 and losses[-1] < losses[0], (losses, norms)
    import transformers

    return {"bench": "packing", "packing": packing, "shape": shape, "seq": seq, "batch": bs, "steps": steps,
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.jsonl"))
    a = ap.parse_args()
    data = rows(a.rows, SHAPES[a.shape]["vocab_size"], a.min_len, a.max_len)
    for packing in (False, True):  # warm-up: Triton compiles and cuBLAS picks kernels outside the timed runs
        run(a.shape, a.device, packing, data, 3, a.seq, a.bs)
    results = []
    for packing in (False, True):
        row = run(a.shape, a.device, packing, data, a.steps, a.seq, a.bs)
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
