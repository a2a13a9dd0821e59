"""GGUF quantization speed: fasttune's GGML quantizers (export/kquants.py, llama.cpp's reference bytes) on the
GPU and on the CPU, for the tensors of a Llama-3.1-8B-shaped model under llama.cpp's q4_k_m / q8_0 / q6_k
mixtures (random weights, no download). Each run checks the output size of every tensor, then appends one JSONL
row per (device, method) to bench/results/gguf_quant.jsonl. The CPU is timed on the first `--cpu-layers` layers
and reported per layer and extrapolated to the whole model (marked as such).

    python bench/bench_gguf_quant.py --methods q4_k_m,q8_0 --cpu-layers 1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fasttune.export import kquants
from fasttune.export.gguf_types import tensor_type

# Llama-3.1-8B: GGUF tensor name -> (rows, row length) in torch order, per layer and global.
H, I, KV, LAYERS, VOCAB = 4096, 14336, 1024, 32, 128256
LAYER = {"attn_q.weight": (H, H), "attn_k.weight": (KV, H), "attn_v.weight": (KV, H), "attn_output.weight": (H, H),
         "ffn_gate.weight": (I, H), "ffn_up.weight": (I, H), "ffn_down.weight": (H, I)}
GLOBAL = {"token_embd.weight": (VOCAB, H), "output.weight": (VOCAB, H)}


def tensors(layers: int, with_global: bool):
    names = [(f"blk.{i}.{k}", s) for i in range(layers) for k, s in LAYER.items()]
    return names + (list(GLOBAL.items()) if with_global else [])


def run(device: str, method: str, layers: int, with_global: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    total_bytes, values, seconds, types = 0, 0, 0.0, {}
    for name, shape in tensors(layers, with_global):
        kind = tensor_type(name, shape, method, arch="llama", n_layer=LAYERS, n_head=32, n_head_kv=8, tied=False)
        w = (torch.randn(shape, device=device, generator=g) * 0.02).bfloat16()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = kquants.quantize(w, kind) if kind in kquants.QUANTIZERS else w.float().cpu().numpy()
        seconds += time.perf_counter() - t0  # includes the copy of the result to the host
        if kind in kquants.QUANTIZERS:
            block, size = kquants.BLOCKS[kind]
            assert out.shape == (shape[0], shape[1] // block * size), (name, kind, out.shape)
        total_bytes += out.nbytes
        values += w.numel()
        types[kind] = types.get(kind, 0) + 1
    return {"seconds": seconds, "values": values, "bytes_out": total_bytes, "types": types}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="q4_k_m,q8_0,q6_k")
    ap.add_argument("--cpu-layers", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_quant.jsonl"))
    a = ap.parse_args()
    rows = []
    for method in a.methods.split(","):
        plans = [("cpu", a.cpu_layers, False)]
        if torch.cuda.is_available():
            run("cuda", method, 1, False)  # warm-up (kernel launches, allocator)
            plans.insert(0, ("cuda", LAYERS, True))
        for device, layers, with_global in plans:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = run(device, method, layers, with_global)
            full = r["seconds"] if layers == LAYERS else r["seconds"] * LAYERS / layers
            rows.append({"bench": "gguf_quant", "shape": "llama-3.1-8b", "method": method, "device": device,
                         "card": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
                         "layers_timed": layers, "with_embeddings": with_global, "seconds": round(r["seconds"], 3),
                         "seconds_whole_model": round(full, 2), "extrapolated": layers != LAYERS,
                         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda"
                         else None,  # one bf16 weight at a time plus the quantizer's working set
                         "mvalues_per_s": round(r["values"] / r["seconds"] / 1e6, 2), "gib_out": round(
                             r["bytes_out"] / 2**30, 3), "types": r["types"], "torch": torch.__version__,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(json.dumps(rows[-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{'method':8} {'device':6} {'whole 8B (s)':>13} {'Mvalues/s':>10} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['method']:8} {r['device']:6} {r['seconds_whole_model']:>13}{'*' if r['extrapolated'] else ' '} "
              f"{r['mvalues_per_s']:>10} {r['peak_gib'] if r['peak_gib'] is not None else '-':>9}")
    print("* extrapolated from the layers timed")


if __name__ == "__main__":
    main()
