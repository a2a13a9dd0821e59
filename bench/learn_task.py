"""Does a real model learn? SmolLM2-135M-Instruct (embedded, no hub) on a synthetic task this script generates.

Task: answer "What is A plus B?" as exactly "Answer: <A+B>. — fasttune". The base model can add small numbers but
never answers in that form, so exact match starts near 0. Train and held-out prompts use disjoint (A, B) pairs.
Greedy generation with the KV cache scores exact match before and after a short LoRA run; a JSONL row goes to
bench/results/learn_task.jsonl. Runs on a CPU in a few minutes:

    python bench/learn_task.py
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def make_task(seed: int = 0, n_train: int = 200, n_eval: int = 40):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 40) for b in range(1, 40)]
    rng.shuffle(pairs)

    def row(a, b):
        return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"Answer: {a + b}. — fasttune"}]}

    return [row(*p) for p in pairs[:n_train]], [row(*p) for p in pairs[n_train:n_train + n_eval]]


def exact_match(model, tok, rows) -> float:
    from fasttune.generate import generate_text

    hits = 0
    for r in rows:
        want = r["messages"][1]["content"]
        got = generate_text(model, tok, r["messages"][0]["content"], max_new_tokens=16).strip()
        hits += got == want
    return hits / len(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "learn_task.jsonl"))
    a = ap.parse_args()
    import torch

    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

    train, held_out = make_task()
    model, tok = FastLanguageModel.from_pretrained()
    before = exact_match(model, tok, held_out)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, learning_rate=1e-3, train_on_responses_only=True,
                         logging_steps=10)
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=train, args=args)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
    after = exact_match(model, tok, held_out)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    row = {"bench": "learn_task", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "task": "A plus B",
           "train_rows": len(train), "held_out": len(held_out), "steps": a.steps, "exact_match_before": before,
           "exact_match_after": after, "train_seconds": round(seconds, 1), "device": device,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    print(f"held-out exact match: {before:.0%} before -> {after:.0%} after {a.steps} steps ({device})")


if __name__ == "__main__":
    main()
