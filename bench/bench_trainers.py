"""Our model inside TRL's SFTTrainer against our own SFTTrainer: tokens/s and peak memory, same GPU, same run.

Random-init Llama-3.1-8B shape (bench_lora.py's), bf16 LoRA r16 on the 7 projections, recompute on, bs 2 x 2048
pre-tokenized rows (no padding), AdamW, clipping 1.0, constant LR. Each trainer runs in its own process for a
clean peak-memory reading; tokens/s counts the steps after the warm-up ones (per-step wall times from the
trainers' own step boundaries). Every run asserts a finite, falling loss and appends a JSONL row to
bench/results/trainers.jsonl. Usage on a GPU machine:

    python bench/bench_trainers.py                       # both rows, then a table
    python bench/bench_trainers.py --impl trl --shape llama-3.2-1b --steps 6   # one row
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import build_ours, run_row  # noqa: E402


def _rows(vocab: int, n: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (seq,), generator=g).tolist()} for _ in range(n)]


def _pad_tokenizer(vocab: int):
    """A word-level tokenizer of the model's vocabulary size: the rows are pre-tokenized, so the trainers only
    read its size and pad/eos ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def run_one(impl: str, shape: str, bs: int, seq: int, steps: int, warmup: int, r: int,
            autocast: bool = True) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = build_ours(shape, "on", r)
    model.name_or_path = f"random-{shape}"
    torch.cuda.reset_peak_memory_stats()
    vocab = model.arch.vocab_size
    rows = _rows(vocab, 2 * bs, seq)  # two batches, cycled: the loss must fall
    total = warmup + steps
    times: list[float] = []
    if impl == "trl":
        import trl
        from datasets import Dataset

        class StepClock(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                times.append(time.perf_counter())

        args = trl.SFTConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=bs, max_steps=total,
                             gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
                             optim="adamw_torch_fused", logging_steps=1, report_to=[], bf16=autocast,
                             save_strategy="no", max_length=seq, gradient_checkpointing=True, num_train_epochs=100,
                             dataloader_num_workers=0)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=_pad_tokenizer(vocab), callbacks=[StepClock()])
        torch.cuda.synchronize()
        times.append(time.perf_counter())
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        version = {"trl": trl.__version__, "autocast": autocast}
    else:
        from fasttune import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir="/tmp/bench_ours", per_device_train_batch_size=bs, gradient_accumulation_steps=1,
                         learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch_fused",
                         max_steps=total, max_seq_length=seq, bf16=True, shuffle=False)
        trainer = SFTTrainer(model=model, tokenizer=_pad_tokenizer(vocab), train_dataset=rows, args=args)
        trainer.train()
        hist = [h for h in trainer.log_history if "loss" in h]
        losses = [h["loss"] for h in hist]
        # Cumulative tokens/s at each step gives each step's end time since the loop started.
        times = [0.0] + [bs * seq * (i + 1) / h["tokens_per_second"] for i, h in enumerate(hist)]
        # Our trainer logs its peak per phase and restarts the allocator's peak counter for each phase.
        logged_peak = max(v for h in hist for k, v in h.items() if k.startswith("memory/") and k.endswith("_peak_gib"))
        version = {"logged_peak_gib": logged_peak}
    elapsed = times[-1] - times[warmup]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], f"loss did not fall: {losses}"
    return {"bench": "trainers", "impl": impl, "shape": shape, "batch": bs, "seq": seq, "lora_r": r,
            "gradient_checkpointing": "on", "steps": steps, "tokens_per_second": round(bs * seq * steps / elapsed, 1),
            "peak_gib": round(max(torch.cuda.max_memory_allocated() / 2**30, version.get("logged_peak_gib", 0)), 3),
            "loss_first": losses[0],
            "loss_last": losses[-1], "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **version}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "trl"])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--no-autocast", action="store_true", help="trl: bf16=False (the model is bf16 either way)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trainers.jsonl"))
    a = ap.parse_args()
    if a.impl:
        row = run_one(a.impl, a.shape, a.bs, a.seq, a.steps, a.warmup, a.r, autocast=not a.no_autocast)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    rows = []
    for impl, extra in (("ours", []), ("trl", []), ("trl", ["--no-autocast"])):
        cmd = [sys.executable, __file__, "--impl", impl, *extra, "--shape", a.shape, "--bs", str(a.bs), "--seq", str(a.seq),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--r", str(a.r), "--out", a.out]
        row = run_row(cmd, None, f"{impl} {a.shape}")
        if row is not None:
            rows.append(row)
    base = next((r for r in rows if r["impl"] == "ours"), None)
    print(f"\n{'trainer':<20} {'shape':<13} {'tok/s':>9} {'peak GiB':>9} {'vs ours':>8}  card")
    for r in rows:
        speed = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        mem = r["peak_gib"] / base["peak_gib"] if base else float("nan")
        name = r["impl"] + ("" if r.get("autocast", True) else " (bf16=False)")
        print(f"{name:<20} {r['shape']:<13} {r['tokens_per_second']:>9,.0f} {r['peak_gib']:>9.2f} "
              f"{speed:>7.2f}x  (memory {mem:.2f}x)  {r['card']}")


if __name__ == "__main__":
    main()
