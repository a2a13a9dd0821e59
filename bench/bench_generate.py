"""Decode speed: fasttune's KV-cache generate() vs transformers' generate(), same weights, same GPU, same run.

Random-init weights of a real shape (no downloads), random prompt tokens, greedy, a fixed number of new tokens
(no stop token), batch 1 and 64. Implementations: "hf" (transformers' generate, SDPA, its default dynamic cache),
"ours" (fasttune's generate: CUDA-graph decode steps, models/static_decode.py, kept between calls of a batch
size), "ours-eager" (the same steps without graphs, FASTTUNE_CUDA_GRAPHS=0) and "ours-fp8" (our decoder with the same
weights in FP8 with row scales, load_in_fp8's layers, CUDA-graph decode) and "ours-lora" (our decoder with the same weights and
LoRA adapters of rank --lora-r on the 7 projections, B drawn N(0, 0.02), as GRPO samples from its policy). For each
(impl, batch): a
warm-up call of the full length (recorded as first_call_s; for ours it includes capturing the graphs), then
`--repeats` timed calls of a 1-token generate (prefill) and of the full generate; decode tokens/s =
batch x (new - 1) / (full - prefill).
Also reports end-to-end tokens/s, peak GiB, and how many greedy tokens the two implementations share (bf16
rounding makes random-weight models diverge eventually; the CPU tests check exact equality in fp32).
Appends one JSONL row per (impl, batch) to bench/results/generate.jsonl and prints a table. Usage:

    python bench/bench_generate.py                                  # GPU: llama-3.2-1b shape, batch 1 and 64
    python bench/bench_generate.py --shape llama-3.1-8b
    python bench/bench_generate.py --shape qwen3-30b-a3b --impls ours,ours-eager   # MoE: graph decode vs eager
    python bench/bench_generate.py --shape llama-3.1-8b --impls ours,ours-fp8       # FP8 weights
    python bench/bench_generate.py --shape llama-3.1-8b --impls ours,ours-lora --batches 64 --prompt-len 64 --sample
    python bench/bench_generate.py --shape tiny --device cpu --out /tmp/generate.jsonl   # a quick CPU check
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    # mixture of experts (transformers' config class named by "config"; default RoPE)
    "qwen3-30b-a3b": dict(config="Qwen3MoeConfig", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, tie_word_embeddings=False),
    "tiny-moe": dict(config="Qwen3MoeConfig", vocab_size=512, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                     tie_word_embeddings=False),
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def build_pair(shape: str, device: str):
    """transformers' model of the shape (Llama, or the config class a shape names) and our decoder holding the very
    same weight tensors. Stacked experts, which transformers' init leaves as allocated, are drawn N(0, 0.02)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fasttune.models.loading import build_model

    cfg = shape_config(shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    init_experts(hf)
    ours = build_model(ours_config(cfg), hf.state_dict().items(), dtype, device, "bench").eval()
    return hf, ours


def shape_config(shape: str, **extra):
    """transformers' config of a SHAPES entry (LlamaConfig with Llama 3's RoPE, or the class the entry names),
    `extra` fields added."""
    import transformers

    spec = dict(SHAPES[shape])
    name = spec.pop("config", "LlamaConfig")
    rope = dict(rope_parameters=dict(ROPE), rope_scaling=dict(ROPE)) if name == "LlamaConfig" else {}
    return getattr(transformers, name)(**spec, max_position_embeddings=131072, rms_norm_eps=1e-5, **rope, **extra)


def init_experts(model):
    """Draw transformers' stacked experts N(0, 0.02) (its init leaves them as allocated)."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.normal_(0.0, 0.02)


def ours_config(cfg):
    """A copy of transformers' config for our build_model: without transformers' experts implementation choice
    (ours are in models/moe.py)."""
    cfg = copy.deepcopy(cfg)
    cfg._experts_implementation = None
    return cfg


SAMPLING = {}  # --sample: GRPO's sampling settings (temperature 1, no top-k / top-p), else greedy


def run_generate(impl, model, ids, new_tokens: int):
    os.environ["FASTTUNE_CUDA_GRAPHS"] = "0" if impl == "ours-eager" else "1"  # (ours-fp8 / ours-lora: graphs)
    if impl == "hf":
        return model.generate(input_ids=ids, attention_mask=torch_ones(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **SAMPLING)
    return model.generate(input_ids=ids, max_new_tokens=new_tokens, eos_token_id=[], **SAMPLING)


def torch_ones(ids):
    import torch

    return torch.ones_like(ids)


def timed(fn, device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def bench_one(impl, model, ids, new_tokens, repeats, device) -> dict:
    import torch

    # Warm-up (kernels, allocator, caches), timed: a first call of a shape also captures our CUDA graphs, which
    # later calls of that batch size replay (models/static_decode.py's DecodeSession).
    first = timed(lambda: run_generate(impl, model, ids, new_tokens), device)[0]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill = statistics.median(timed(lambda: run_generate(impl, model, ids, 1), device)[0] for _ in range(repeats))
    fulls, out = [], None
    for _ in range(repeats):
        t, out = timed(lambda: run_generate(impl, model, ids, new_tokens), device)
        fulls.append(t)
    full = statistics.median(fulls)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    b = ids.shape[0]
    return {"decode_tokens_per_second": round(b * (new_tokens - 1) / max(full - prefill, 1e-9), 1),
            "end_to_end_tokens_per_second": round(b * new_tokens / full, 1), "prefill_s": round(prefill, 4),
            "generate_s": round(full, 4), "first_call_s": round(first, 4),
            "first_call_tokens_per_second": round(b * new_tokens / first, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
            "_out": out}


def main():
    import torch
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--impls", default="hf,ours,ours-eager")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16, help="rank of ours-lora's adapters")
    ap.add_argument("--sample", action="store_true", help="sample (temperature 1, no top-k / top-p) instead of greedy")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.jsonl"))
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device; run with --device cpu (and --shape tiny) for a functional check.")
    hf, ours = build_pair(a.shape, a.device)
    models = {"hf": hf, "ours": ours, "ours-eager": ours}
    if "ours-fp8" in a.impls.split(","):
        from fasttune.models.loading import build_model

        models["ours-fp8"] = build_model(ours_config(hf.config), hf.state_dict().items(), ours.dtype, a.device,
                                         "bench", quant="fp8").eval()
    if "ours-lora" in a.impls.split(","):
        models["ours-lora"] = with_lora(hf, a.lora_r, a.device)
    if a.sample:
        SAMPLING.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    vocab = SHAPES[a.shape]["vocab_size"]
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, a.prompt_len), generator=g).to(a.device)
        impls = a.impls.split(",")
        results = {impl: bench_one(impl, models[impl], ids, a.new_tokens, a.repeats, a.device) for impl in impls}
        outs = {i: results[i].pop("_out")[:, a.prompt_len:] for i in impls}
        for impl, r in results.items():
            same = (outs[impl] == outs[impls[0]]).int().cumprod(dim=1).sum(dim=1)  # shared greedy prefix per row
            row = {"bench": "generate", "impl": impl, "shape": a.shape, "batch": batch, "prompt_len": a.prompt_len,
                   "new_tokens": a.new_tokens, "sampling": "sample" if a.sample else "greedy",
                   "lora_r": a.lora_r if impl == "ours-lora" else None, **r, "greedy_prefix_shared_min": int(same.min()),
                   "dtype": str(ours.dtype).removeprefix("torch."), "card": card, "torch": torch.__version__,
                   "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print_table(rows)


def with_lora(hf, r: int, device: str):
    """Our decoder over hf's weight tensors (no copy) with LoRA r on the 7 projections, B drawn N(0, 0.02) so the
    adapters change the logits."""
    import torch

    from fasttune import FastLanguageModel
    from fasttune.models.loading import build_model

    model = build_model(ours_config(hf.config), hf.state_dict().items(), hf.dtype, device, "bench")
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, random_state=0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def print_table(rows):
    print(f"\n{'impl':<10} {'batch':>5} {'decode tok/s':>13} {'e2e tok/s':>10} {'prefill s':>10} {'peak GiB':>9} "
          f"{'vs ' + rows[0]['impl']:>8} {'shared':>7}  card")
    base = {r["batch"]: r["decode_tokens_per_second"] for r in rows if r["impl"] == rows[0]["impl"]}
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['impl']:<10} {r['batch']:>5} {r['decode_tokens_per_second']:>13,.0f} "
              f"{r['end_to_end_tokens_per_second']:>10,.0f} {r['prefill_s']:>10.4f} {peak:>9} "
              f"{r['decode_tokens_per_second'] / base[r['batch']]:>8.2f} {r['greedy_prefix_shared_min']:>7}  "
              f"{r['card']}")


if __name__ == "__main__":
    main()
