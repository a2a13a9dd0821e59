"""Sequence-classification LoRA throughput and peak memory: fasttune's SequenceClassifier vs transformers'
<Family>ForSequenceClassification + PEFT (task_type SEQ_CLS), same GPU, same run.

Random-init weights of a real shape (bench_lora.py's SHAPES), LoRA r16 on the 7 projections plus the trained
`score` head on both sides, bs x seq random tokens with a fixed random class per row (two batches cycled, so the
loss must fall), AdamW, grad clipping 1.0, one process per row. Every row asserts grad-norm > 0 and a falling loss,
then appends a JSONL row to bench/results/classifier.jsonl. Usage on a GPU machine:

    python bench/bench_classifier.py --matrix default        # 8B shape, 2 x 2048, 4 classes: hf / ours x gc on / off
    python bench/bench_classifier.py --impl ours --shape llama-3.1-8b --gc on    # one row
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
from bench_lora import SHAPES, hf_config, run_row, targets  # noqa: E402

MATRIX = {"default": [("hf", "on"), ("ours", "on"), ("hf", "off"), ("ours", "off")]}


def build(impl: str, shape: str, gc: str, r: int, num_labels: int):
    """(model, trainable parameters) of `impl` ("ours" | "hf") with LoRA on the projections and the score head."""
    import torch

    cfg = hf_config(shape)
    cfg.num_labels, cfg.pad_token_id = num_labels, 0
    if impl == "ours":
        from fasttune.api import FastLanguageModel
        from fasttune.models.sequence_classification import SequenceClassifier

        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = SequenceClassifier(cfg)
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
        model.lora_settings = None
        model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, target_modules=targets(shape),
                                                 use_gradient_checkpointing={"on": True, "off": False}[gc])
    else:
        import transformers
        from peft import LoraConfig, get_peft_model

        with torch.device("cuda"):
            model = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.bfloat16,
                                                                                attn_implementation="sdpa")
        if gc == "on":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets(shape),
                                                 task_type="SEQ_CLS"))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def run_one(a) -> dict:
    import torch

    torch.manual_seed(0)
    model, params = build(a.impl, a.shape, a.gc, a.r, a.num_labels)
    torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    vocab = SHAPES[a.shape]["vocab_size"]
    batches = [(torch.randint(1, vocab, (a.bs, a.seq), device="cuda", generator=g),
                torch.randint(0, a.num_labels, (a.bs,), device="cuda", generator=g)) for _ in range(2)]
    losses, norms = [], []

    def step(i):
        ids, labels = batches[i % 2]
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    for i in range(a.warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert min(norms) > 0, f"grad norm was 0: {norms}"
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    # the loss of one batch, first seen against last seen (the two batches alternate)
    first, last = losses[0], losses[-2 if len(losses) % 2 == 0 else -1]
    assert last < first, f"loss did not fall: {losses}"
    import peft
    import transformers

    return {"bench": "classifier", "impl": a.impl, "shape": a.shape, "num_labels": a.num_labels,
            "gradient_checkpointing": a.gc, "batch": a.bs, "seq": a.seq, "lora_r": a.r, "steps": a.steps,
            "tokens_per_second": round(a.bs * a.seq * a.steps / elapsed, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "loss_first": first, "loss_last": last, "grad_norm_min": min(norms),
            "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", choices=sorted(MATRIX))
    ap.add_argument("--impl", choices=["ours", "hf"], default="ours")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--gc", choices=["on", "off"], default="on")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--num-labels", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "classifier.jsonl"))
    a = ap.parse_args()
    if a.matrix is None:
        row = run_one(a)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    rows = []
    for impl, gc in MATRIX[a.matrix]:
        cmd = [sys.executable, __file__, "--impl", impl, "--shape", a.shape, "--gc", gc, "--bs", str(a.bs),
               "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--r", str(a.r),
               "--num-labels", str(a.num_labels), "--out", a.out]
        row = run_row(cmd, dict(os.environ), f"{impl} gc={gc}")
        if row is not None:
            rows.append(row)
    base = {r["gradient_checkpointing"]: r["tokens_per_second"] for r in rows if r["impl"] == "hf"}
    print(f"\n{'impl':<5} {'recompute':<9} {'tokens/s':>9} {'peak GiB':>9} {'vs hf':>6}  card")
    for r in rows:  # each row against transformers + PEFT with the same recompute setting
        gc = r["gradient_checkpointing"]
        ratio = r["tokens_per_second"] / base[gc] if gc in base else float("nan")
        print(f"{r['impl']:<5} {gc:<9} {r['tokens_per_second']:>9,.0f} {r['peak_gib']:>9.2f} {ratio:>6.2f}  "
              f"{r['card']}")


if __name__ == "__main__":
    main()
