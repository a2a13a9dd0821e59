"""Data-parallel scaling and equivalence through the real trainer, launched by torchrun.

The same global batch two ways: 1 GPU with gradient accumulation N, and N GPUs with accumulation 1. The loss
curves must agree (bf16 tolerance) and tokens/s should scale ~N x. Random-init weights of a real shape, LoRA r16,
pre-tokenized learnable rows of `--seq` tokens. Usage on a 2-GPU machine:

    python bench/bench_ddp.py --gpus 2            # runs both launches and prints the table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_packing import SHAPES, build, rows  # noqa: E402


def worker(a):
    import torch

    from fasttune import SFTConfig, SFTTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before building: each rank on its own GPU
    data = rows(256, SHAPES[a.shape]["vocab_size"], a.seq, a.seq + 1)
    model = build(a.shape, "cuda")
    results = {}
    for name, steps in (("warmup", 2), ("timed", a.steps)):
        with tempfile.TemporaryDirectory() as out:
            args = SFTConfig(output_dir=out, max_seq_length=a.seq, max_steps=steps, learning_rate=1e-3,
                             per_device_train_batch_size=a.bs, gradient_accumulation_steps=a.grad_accum,
                             logging_steps=1, lr_scheduler_type="constant", shuffle=False, seed=0)
            trainer = SFTTrainer(model=model, tokenizer=None, train_dataset=data, args=args)
            torch.cuda.reset_peak_memory_stats()
            results[name] = (trainer.train(), [h["loss"] for h in trainer.log_history])
    metrics, losses = results["timed"]
    if trainer.dist.is_main:
        import transformers

        print(json.dumps({"bench": "ddp", "gpus": world, "grad_accum": a.grad_accum, "shape": a.shape,
                          "batch_per_gpu": a.bs, "seq": a.seq, "steps": a.steps,
                          "tokens_per_second": round(metrics["train_tokens_per_second"], 1),
                          "peak_gib_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 3), "losses": losses,
                          "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddp.jsonl"))
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    rows_out = []
    for gpus, ga in ((1, a.gpus), (a.gpus, 1)):  # the same global batch both ways
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__,
               "--worker", "--shape", a.shape, "--seq", str(a.seq), "--bs", str(a.bs), "--steps", str(a.steps),
               "--grad-accum", str(ga)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAILED gpus={gpus}:\n{proc.stderr[-3000:]}", flush=True)
            return
        row = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
        rows_out.append(row)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    one, many = rows_out
    diffs = [abs(x - y) / abs(x) for x, y in zip(one["losses"], many["losses"])]
    print(f"\n{'gpus':<5} {'GA':<3} {'tok/s':>9} {'peak GiB r0':>12}  card")
    for r in rows_out:
        print(f"{r['gpus']:<5} {r['grad_accum']:<3} {r['tokens_per_second']:>9,.0f} {r['peak_gib_rank0']:>12.2f}  "
              f"{r['card']}")
    print(f"scaling {many['tokens_per_second'] / one['tokens_per_second']:.2f}x; max relative loss difference "
          f"per step {max(diffs):.2e}; losses 1 GPU {one['losses'][0]:.3f}->{one['losses'][-1]:.3f}, "
          f"{a.gpus} GPUs {many['losses'][0]:.3f}->{many['losses'][-1]:.3f}")


if __name__ == "__main__":
    main()
