"""Batch-1 decode kernels against what they replace, timed inside CUDA graphs as a decode step runs them.

- GEMV (kernels/gemv.py: `gemv`, `gated_gemv`) against cuBLAS's F.linear for the projections of a Llama-3.2-1B and a
  Llama-3.1-8B layer. The weights are cycled through ~200 MB of copies, more than the H200's 50 MB L2, because a
  decode step reads every weight from HBM once: timing one weight over and over measures the L2 instead (an
  earlier comparison made that mistake and concluded cuBLAS was faster for large weights).
- FP8 products of few rows (kernels/fp8.py: `fp8_linear`, which sends 2-128 rows to its Triton kernel where
  `few_rows_pay`) against cuBLAS' FP8 GEMM (`torch._scaled_mm`, row-wise scales) and the bf16 GEMM of the same
  weight, the Llama-3.1-8B layer's four weight sizes at 1, 16, 64 and 128 rows; the error is the largest excess over
  bf16 rounding of the exact sum, in units of the sum of |products| (kernels/fp8.py's test bound is 2^-12).
- Decode attention (kernels/decode_attention.py: RoPE, cache write and attention in one kernel) against the
  unfused path (apply_rope_qk, two index_copy_, SDPA with the additive mask), 8 KV heads, for batch 1 and 64.

Appends one JSONL row per case (us per call, GB/s for the GEMVs, the max abs difference from the reference) to
bench/results/decode_kernels.jsonl and prints a table. Usage:

    python bench/bench_decode_kernels.py                                   # a GPU machine
    TRITON_INTERPRET=1 python bench/bench_decode_kernels.py --device cpu --out /tmp/k.jsonl   # functional check
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYERS = {"llama-3.2-1b": (2048, 2048, 512, 8192), "llama-3.1-8b": (4096, 4096, 1024, 14336)}  # h, q, kv, inter
ATTENTION = [(1, 64, 256), (1, 64, 512), (1, 128, 512), (1, 64, 4096), (64, 64, 512)]  # batch, head_dim, slots


def timed_us(fns, device: str, reps: int = 8) -> float:
    """Microseconds per call of each of `fns` (called in turn): replayed from one CUDA graph on a GPU, eager on a
    CPU (a functional check, not a measurement)."""
    if device != "cuda":
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: kernel builds, cuBLAS workspaces
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps * len(fns)) * 1000


def gemv_rows(device: str, dtype, budget: int) -> list[dict]:
    from fasttune.kernels.gemv import gated_gemv, gemv

    rows = []
    for shape, (h, q, kv, inter) in LAYERS.items():
        cases = {  # name: (weight shapes, x width, ours, cuBLAS)
            "qkv": ([(q, h), (kv, h), (kv, h)], h, lambda x, ws: gemv(x, ws, [None] * 3),
                    lambda x, ws: [F.linear(x, w) for w in ws]),
            "o_proj": ([(h, q)], q, lambda x, ws: gemv(x, ws, [None]), lambda x, ws: F.linear(x, ws[0])),
            "gate_up_act": ([(inter, h), (inter, h)], h, lambda x, ws: gated_gemv(x, *ws, None, None, "silu"),
                            lambda x, ws: F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1])),
            "down_proj": ([(h, inter)], inter, lambda x, ws: gemv(x, ws, [None]), lambda x, ws: F.linear(x, ws[0])),
        }
        for name, (shapes, k, ours, cublas) in cases.items():
            nbytes = sum(n * kk for n, kk in shapes) * torch.finfo(dtype).bits // 8
            copies = max(2, budget // nbytes)
            sets = [[torch.randn(s, device=device, dtype=dtype) * 0.02 for s in shapes] for _ in range(copies)]
            x = torch.randn(1, 1, k, device=device, dtype=dtype)
            ours_us = timed_us([lambda ws=ws: ours(x, ws) for ws in sets], device)
            ref_us = timed_us([lambda ws=ws: cublas(x, ws) for ws in sets], device)
            got, want = ours(x, sets[0]), cublas(x, sets[0])
            got, want = (torch.cat([t.flatten() for t in v]) if isinstance(v, (list, tuple)) else v.flatten()
                         for v in (got, want))
            rows.append(dict(kernel="gemv", shape=shape, case=name, ours_us=round(ours_us, 2),
                             reference_us=round(ref_us, 2), ours_gb_s=round(nbytes / ours_us / 1e3),
                             reference_gb_s=round(nbytes / ref_us / 1e3), weight_copies=copies,
                             max_abs_diff=float((got.float() - want.float()).abs().max())))
    return rows


def fp8_rows(device: str, budget: int) -> list[dict]:
    from fasttune.kernels.fp8 import fp8_gemm_runs, fp8_linear, quantize_rows, scaled_mm_reference

    rows, bf16 = [], torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
              "down_proj": (4096, 14336)} if device == "cuda" else {"tiny": (64, 32)}
    for name, (n, k) in shapes.items():
        copies = max(2, budget // (n * k * 2))
        ws16 = [torch.randn(n, k, device=device, dtype=bf16) * 0.02 for _ in range(copies)]
        q8 = [(q, s.view(-1)) for q, s in (quantize_rows(w) for w in ws16)]
        for m in (1, 16, 64, 128):
            xq, xs = quantize_rows(torch.randn(m, k, device=device, dtype=bf16))

            def cublas(q, s):
                if fp8_gemm_runs(xq, n, k, m):
                    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.view(1, n), out_dtype=bf16)
                return scaled_mm_reference(xq, xs, q.t(), s.view(1, n), bf16)

            ours_us = timed_us([lambda q=q, s=s: fp8_linear(xq, xs, q, s, bf16) for q, s in q8], device)
            ref_us = timed_us([lambda q=q, s=s: cublas(q, s) for q, s in q8], device)
            bf16_us = timed_us([lambda w=w: F.linear(xq.to(bf16), w) for w in ws16], device)
            q, s = q8[0]
            want = scaled_mm_reference(xq, xs, q.t(), s.view(1, n), torch.float32)
            sum_abs = scaled_mm_reference(xq.float().abs().to(xq.dtype), xs, q.float().abs().to(q.dtype).t(),
                                          s.view(1, n), torch.float32)
            err = {}
            for key, got in (("ours", fp8_linear(xq, xs, q, s, bf16)), ("reference", cublas(q, s))):
                err[key] = float((((got.float() - want).abs() - 2 ** -8 * want.abs()) / sum_abs).max())
            rows.append(dict(kernel="fp8_linear", shape="llama-3.1-8b" if device == "cuda" else "tiny", case=name,
                             rows=m, ours_us=round(ours_us, 2), reference_us=round(ref_us, 2),
                             bf16_us=round(bf16_us, 2), weight_copies=copies, ours_error=err["ours"],
                             reference_error=err["reference"]))
    return rows


def attention_rows(device: str, dtype) -> list[dict]:
    from fasttune.kernels.decode_attention import decode_attention, decode_attention_reference

    rows = []
    for b, d, s in ATTENTION:
        hq, hkv = 32, 8
        q, k, v = (torch.randn(b, 1, n, d, device=device, dtype=dtype) for n in (hq, hkv, hkv))
        cos, sin = (torch.rand(b, 1, d, device=device, dtype=dtype) for _ in range(2))
        k_cache, v_cache = (torch.randn(b, hkv, s, d, device=device, dtype=dtype) for _ in range(2))
        slot = torch.tensor([s - 60], device=device)
        mask = torch.zeros(b, 1, 1, s, device=device, dtype=dtype)
        mask[..., s - 59:] = float("-inf")
        args = (q, k, v, cos, sin, k_cache, v_cache, slot, mask, d ** -0.5)
        ours_us = timed_us([lambda: decode_attention(*args)], device, reps=20)
        ref_us = timed_us([lambda: decode_attention_reference(*args)], device, reps=20)
        diff = (decode_attention(*args).float() - decode_attention_reference(*args).float()).abs().max()
        rows.append(dict(kernel="decode_attention", batch=b, heads=f"{hq}/{hkv}", head_dim=d, slots=s,
                         ours_us=round(ours_us, 2), reference_us=round(ref_us, 2), max_abs_diff=float(diff)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_kernels.jsonl"))
    args = parser.parse_args()
    import transformers

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    budget = 200 << 20 if args.device == "cuda" else 1 << 20  # bytes of weight copies per case
    if args.device != "cuda":
        LAYERS.update({"tiny": (64, 64, 32, 128)})
        for key in ("llama-3.2-1b", "llama-3.1-8b"):
            LAYERS.pop(key)
        ATTENTION[:] = [(1, 16, 64), (4, 16, 64)]
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(bench="decode_kernels", dtype=str(dtype).removeprefix("torch."), card=card, torch=torch.__version__,
                transformers=transformers.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    rows = gemv_rows(args.device, dtype, budget) + fp8_rows(args.device, budget) + attention_rows(args.device, dtype)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")
    print(f"{'kernel':18s} {'case':34s} {'ours us':>9s} {'ref us':>9s} {'ratio':>6s}")
    for r in rows:
        case = {"gemv": lambda: f"{r['shape']} {r['case']}", "fp8_linear": lambda: f"{r['case']} x {r['rows']} rows"
                }.get(r["kernel"], lambda: f"b{r['batch']} d{r['head_dim']} {r['slots']} slots")()
        print(f"{r['kernel']:18s} {case:34s} {r['ours_us']:9.2f} {r['reference_us']:9.2f} "
              f"{r['reference_us'] / r['ours_us']:6.2f}")


if __name__ == "__main__":
    main()
