"""LoRA training throughput and peak memory: fasttune vs transformers+PEFT, same GPU, same run.

Random-init weights of real shapes (no downloads), LoRA r16 on the 7 projections, bs x seq random tokens drawn
once and cycled (so the loss must fall), AdamW, grad clipping 1.0. Each (impl, shape, checkpointing) runs in its
own process for a clean peak-memory reading. Every run asserts grad-norm > 0 and a falling loss, then appends a
JSONL row to bench/results/. Usage on a GPU machine:

    python bench/bench_lora.py --matrix default          # the table below, one process per row
    python bench/bench_lora.py --impl ours --shape llama-3.2-1b --gc on   # a single row
"""
from __future__ import annotations

import argparse
import json
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
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (impl, shape, gradient checkpointing, our kernels: FASTTUNE_KERNELS)
MATRIX = {
    "default": [("hf", "llama-3.2-1b", "on", "-"), ("ours", "llama-3.2-1b", "on", "triton"),
                ("ours", "llama-3.2-1b", "off", "triton"), ("ours", "llama-3.2-1b", "off", "torch"),
                ("hf", "llama-3.1-8b", "on", "-"), ("ours", "llama-3.1-8b", "on", "triton"),
                ("ours", "llama-3.1-8b", "on", "torch"), ("ours", "llama-3.1-8b", "off", "triton")],
}


def hf_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_parameters=dict(ROPE),
                       rope_scaling=dict(ROPE), rms_norm_eps=1e-5)


def build_ours(shape: str, gc: bool, r: int):
    import torch

    from fasttune.api import FastLanguageModel
    from fasttune.models.config import ModelConfig
    from fasttune.models.decoder import CausalLM

    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of the weights on the card
    with torch.device("cuda"):
        model = CausalLM(ModelConfig.from_hf(hf_config(shape)))
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # transformers' init (normal, std = initializer_range) so both start from alike weights
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.lora_settings = None
    return FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, use_gradient_checkpointing=gc)


def build_hf(shape: str, gc: bool, r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16, attn_implementation="sdpa")
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model


def run_one(impl: str, shape: str, gc: str, bs: int, seq: int, steps: int, warmup: int, r: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = (build_ours if impl == "ours" else build_hf)(shape, gc == "on", r)
    torch.cuda.reset_peak_memory_stats()  # after building: the peak still holds the weights, not init transients
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device="cuda").manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    batches = [torch.randint(0, vocab, (bs, seq), device="cuda", generator=g) for _ in range(2)]
    losses, norms = [], []

    def step(i):
        ids = batches[i % len(batches)]
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert min(norms) > 0, f"grad norm was 0: {norms}"
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    import transformers

    row = {"bench": "lora_sft", "impl": impl, "kernels": os.environ.get("FASTTUNE_KERNELS") or "default", "shape": shape, "gradient_checkpointing": gc, "batch": bs, "seq": seq,
           "lora_r": r, "steps": steps, "tokens_per_second": round(bs * seq * steps / elapsed, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "loss_first": losses[0],
           "loss_last": losses[-1], "grad_norm_min": min(norms), "card": torch.cuda.get_device_name(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if impl == "hf":
        import peft

        row["peft"] = peft.__version__
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", choices=sorted(MATRIX))
    ap.add_argument("--impl", choices=["ours", "hf"], default="ours")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--gc", choices=["on", "off"], default="on")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_sft.jsonl"))
    a = ap.parse_args()
    if a.matrix:
        rows = []
        for impl, shape, gc, kernels in MATRIX[a.matrix]:
            env = dict(os.environ, FASTTUNE_KERNELS=kernels if kernels != "-" else "")
            cmd = [sys.executable, __file__, "--impl", impl, "--shape", shape, "--gc", gc, "--bs", str(a.bs),
                   "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--r", str(a.r),
                   "--out", a.out]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"FAILED {impl} {shape} gc={gc}:\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        print_table(rows)
        return
    row = run_one(a.impl, a.shape, a.gc, a.bs, a.seq, a.steps, a.warmup, a.r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def print_table(rows):
    print(f"\n{'impl':<5} {'kernels':<8} {'shape':<13} {'gc':<3} {'tok/s':>9} {'peak GiB':>9} {'vs hf':>6}  card")
    base = {(r["shape"]): r["tokens_per_second"] for r in rows if r["impl"] == "hf"}
    for r in rows:
        ratio = r["tokens_per_second"] / base[r["shape"]] if r["shape"] in base else float("nan")
        print(f"{r['impl']:<5} {r.get('kernels', '-'):<8} {r['shape']:<13} {r['gradient_checkpointing']:<3} {r['tokens_per_second']:>9,.0f} "
              f"{r['peak_gib']:>9.2f} {ratio:>6.2f}  {r['card']}")


if __name__ == "__main__":
    main()
