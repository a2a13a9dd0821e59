"""DPO steps on preference pairs with images: fasttune vs transformers + PEFT computing DPO as TRL's DPOTrainer does,
same GPU, same run.

bench_vision.py's shapes and batches (random-init weights of a real vision-language shape built by transformers with
the same seed on both sides; each row text + one image's placeholders + text, `seq` tokens): a batch's first half of
rows are the chosen completions, the second half the rejected ones; the last `completion` tokens of each row are
scored. A step is one reference pass (the adapter switched off, no gradients) and one policy pass over the 2 x pairs
rows, the sigmoid DPO loss (beta 0.1), backward, clipping 1.0 and AdamW (fused, lr 1e-5). transformers + PEFT: the logits of
the whole rows, then per-token log-probs of the scored tokens through a log-softmax per row (TRL's
selective_log_softmax for 16-bit logits), recompute on; fasttune: its DPOTrainer's log-probs (the scored positions
only through the LM head, in chunks), recompute on. Two batches cycled, 3 warm-up steps, 10 timed; each row in its
own process; asserts a falling loss and grad-norm > 0; appends JSONL rows to bench/results/vision_dpo.jsonl.

    python bench/bench_vision_dpo.py                          # qwen2.5-vl-7b, 1 pair of 2048-token rows: hf, ours
    OMP_NUM_THREADS=1 python bench/bench_vision_dpo.py --smoke --out /tmp/v.jsonl   # CPU check, tiny shape
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_vision import SHAPES, build_hf, build_ours, hf_forward_kwargs, make_batches  # noqa: E402

MEDIA = ("pixel_values", "image_grid_thw", "image_sizes", "image_position_ids")


def run_one(impl: str, shape: str, pairs: int, seq: int, completion: int, steps: int, warmup: int, r: int,
            smoke: bool) -> dict:
    import torch
    import torch.nn.functional as F

    shape = SHAPES[shape]["tiny"] if smoke else shape
    device = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    model, note = (build_ours if impl == "ours" else build_hf)(shape, "on", r, device)
    extra = hf_forward_kwargs(model, shape)[0] if impl == "hf" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 1e-5: summed over hundreds of random tokens, the log-ratios grow fast enough to saturate the loss at 1e-3
    opt = torch.optim.AdamW(params, lr=1e-5 if not smoke else 1e-3, weight_decay=0.0, fused=device == "cuda")
    batches, placeholders = make_batches(shape, 2 * pairs, seq, device)
    score = torch.zeros(2 * pairs, seq, dtype=torch.long, device=device)
    score[:, -completion:] = 1

    if impl == "ours":
        from fasttune.train.objectives.reference import adapters_disabled, model_token_logprobs

        def summed(b):
            media = {k: b[k] for k in MEDIA if k in b}
            return model_token_logprobs(model, b["input_ids"], b["attention_mask"], score, media=media).sum(-1)

        def reference(b):
            with torch.no_grad(), adapters_disabled(model):
                return summed(b)
    else:
        def summed(b):
            inputs = {k: v for k, v in b.items() if k != "labels"}
            logits = model(**inputs, **extra(b)).logits[:, :-1]
            targets = b["input_ids"][:, 1:]
            logps = torch.stack([row.float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)  # (TRL's, per row)
                                 for row, t in zip(logits, targets)])
            return (logps * score[:, 1:]).sum(-1)

        def reference(b):
            with torch.no_grad(), model.disable_adapter():
                return summed(b)

    losses, norms = [], []

    def step(i):
        b = batches[i % len(batches)]
        ref_c, ref_r = reference(b).chunk(2)
        pol_c, pol_r = summed(b).chunk(2)
        loss = -F.logsigmoid(0.1 * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    for i in range(warmup):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert min(norms) > 0 and all(math.isfinite(v) for v in losses), f"grad norms {norms}, losses {losses}"
    last_same = losses[(len(losses) - 1) // 2 * 2]  # the last step on the first step's batch
    assert last_same < losses[0], f"loss did not fall: {losses}"
    import peft
    import transformers

    return {"bench": "vision_dpo", "impl": impl, "shape": shape, "pairs": pairs, "seq": seq,
            "completion_tokens": completion, "image_tokens_per_row": placeholders, "lora_r": r,
            "gradient_checkpointing": "on", "steps": steps,
            "tokens_per_second": round(2 * pairs * seq * steps / elapsed, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
            "losses": [round(v, 5) for v in losses], "grad_norm_min": min(norms),
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "note": note + ("; SMOKE (tiny shape, CPU)" if smoke else ""),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "hf"])
    ap.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(s for s in SHAPES if not s.startswith("tiny")))
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--completion", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_dpo.jsonl"))
    a = ap.parse_args()
    if a.smoke:
        a.seq, a.completion, a.steps = 128, 32, 3
    rows = []
    for impl in [a.impl] if a.impl else ["hf", "ours"]:
        if a.impl or a.smoke:
            row = run_one(impl, a.shape, a.pairs, a.seq, a.completion, a.steps, a.warmup, a.r, a.smoke)
        else:  # a fresh process per row: a clean peak-memory reading
            import subprocess

            cmd = [sys.executable, __file__, "--impl", impl, "--shape", a.shape, "--pairs", str(a.pairs), "--seq",
                   str(a.seq), "--completion", str(a.completion), "--steps", str(a.steps), "--warmup",
                   str(a.warmup), "--r", str(a.r), "--out", a.out]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                print(f"FAILED {impl}:\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{"))))
            continue
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["impl"] == "hf"), None)
    print(f"\n{'impl':<5} {'tokens/s':>9} {'peak GiB':>9} {'vs hf':>6}  card")
    for r in rows:
        ratio = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        peak = f"{r['peak_gib']:>9.2f}" if r["peak_gib"] is not None else f"{'-':>9}"
        print(f"{r['impl']:<5} {r['tokens_per_second']:>9,.0f} {peak} {ratio:>6.2f}  {r['card']}")


if __name__ == "__main__":
    main()
