"""Reward-model training throughput and peak memory: fasttune's RewardTrainer against TRL's RewardTrainer on
transformers' classifier + PEFT (what a TRL user runs), and our classifier inside TRL's RewardTrainer, same GPU.

Random-init Llama-3.1-8B shape (bench_lora.py's), one-output score head, LoRA r16 on the 7 projections, recompute
on, one pair per step of two `seq`-token rows (random words of a word-level tokenizer of the model's vocabulary,
EOS appended by both trainers), two pairs cycled, AdamW (fused), constant LR 1e-4, clipping 1.0. Each row in its
own process; tokens/s over the steps after the warm-up ones (per-step wall times from the trainers' own step
boundaries). Every row asserts a finite loss that falls on the same pair and appends a JSONL row to
bench/results/reward.jsonl. Usage on a GPU machine:

    python bench/bench_reward.py                      # the three rows, then a table
    python bench/bench_reward.py --impl ours --steps 6  # one row
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_classifier import build  # noqa: E402
from bench_lora import SHAPES, run_row  # noqa: E402

IMPLS = ("ours", "trl", "ours-in-trl")


def _word_tokenizer(vocab: int):
    """Words w2..w{vocab-1} as ids 2.., <pad> 0, <eos> 1, split on whitespace: both trainers tokenize the same rows
    to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _pairs(vocab: int, seq: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)

    def text():
        return " ".join(f"w{i}" for i in torch.randint(2, vocab, (seq - 1,), generator=g).tolist())

    return [{"chosen": text(), "rejected": text()} for _ in range(2)]


def run_one(impl: str, shape: str, seq: int, steps: int, warmup: int, r: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model, _ = build("hf" if impl == "trl" else "ours", shape, "on", r, 1)
    model.name_or_path = f"random-{shape}"
    torch.cuda.reset_peak_memory_stats()
    vocab = SHAPES[shape]["vocab_size"]
    tok, rows, total = _word_tokenizer(vocab), _pairs(vocab, seq), warmup + steps
    times: list[float] = []
    extra = {}
    if impl in ("trl", "ours-in-trl"):
        import trl
        from datasets import Dataset

        class StepClock(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                times.append(time.perf_counter())

        args = trl.RewardConfig(output_dir="/tmp/bench_reward_trl", per_device_train_batch_size=1, max_steps=total,
                                learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch_fused",
                                logging_steps=1, report_to=[], bf16=True, save_strategy="no", max_length=seq,
                                gradient_checkpointing=True, dataloader_num_workers=0,
                                train_sampling_strategy="sequential")
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tok, callbacks=[StepClock()])
        torch.cuda.synchronize()
        times.append(time.perf_counter())
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        extra = {"trl": trl.__version__}
    else:
        from fasttune import RewardConfig, RewardTrainer

        args = RewardConfig(output_dir="/tmp/bench_reward_ours", per_device_train_batch_size=1,
                            gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
                            optim="adamw_torch_fused", max_steps=total, max_seq_length=seq, bf16=True, shuffle=False)
        trainer = RewardTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
        trainer.train()
        hist = [h for h in trainer.log_history if "loss" in h]
        losses = [h["loss"] for h in hist]
        # cumulative tokens/s at each step gives each step's end time since the loop started
        times = [0.0] + [2 * seq * (i + 1) / h["tokens_per_second"] for i, h in enumerate(hist)]
        logged = max(v for h in hist for k, v in h.items() if k.startswith("memory/") and k.endswith("_peak_gib"))
        extra = {"logged_peak_gib": logged}
    elapsed = times[-1] - times[warmup]
    same = len(losses) - 1 - (len(losses) - 1) % 2  # the last step on the first step's pair
    assert all(math.isfinite(v) for v in losses) and losses[same] < losses[0], f"loss did not fall: {losses}"
    import peft

    return {"bench": "reward", "impl": impl, "shape": shape, "pair_rows": 2, "seq": seq, "lora_r": r,
            "gradient_checkpointing": "on", "steps": steps,
            "tokens_per_second": round(2 * seq * steps / elapsed, 1),
            "peak_gib": round(max(torch.cuda.max_memory_allocated() / 2**30, extra.get("logged_peak_gib", 0)), 3),
            "loss_first": losses[0], "loss_last_same_pair": losses[same], "card": torch.cuda.get_device_name(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=IMPLS)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward.jsonl"))
    a = ap.parse_args()
    if a.impl:
        row = run_one(a.impl, a.shape, a.seq, a.steps, a.warmup, a.r)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    rows = []
    for impl in ("trl", "ours", "ours-in-trl"):
        cmd = [sys.executable, __file__, "--impl", impl, "--shape", a.shape, "--seq", str(a.seq), "--steps",
               str(a.steps), "--warmup", str(a.warmup), "--r", str(a.r), "--out", a.out]
        row = run_row(cmd, None, impl)
        if row is not None:
            rows.append(row)
    base = next((r for r in rows if r["impl"] == "trl"), None)
    print(f"\n{'trainer':<12} {'tokens/s':>9} {'peak GiB':>9} {'vs TRL':>7}  card")
    for r in rows:
        ratio = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        print(f"{r['impl']:<12} {r['tokens_per_second']:>9,.0f} {r['peak_gib']:>9.2f} {ratio:>7.2f}  {r['card']}")


if __name__ == "__main__":
    main()
