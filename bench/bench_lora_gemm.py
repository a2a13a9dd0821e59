"""The fused LoRA's GEMM order and the NF4 dequantisation kernel, timed alone on the 8B shape's projections.

- order: out = x @ W^T + s * (x A^T) @ B^T for a projection, two ways. "base first" writes the base product, then a
  rank-r GEMM reads and writes the whole output again to add the LoRA term (kernels/lora.py before 9c6baec). "LoRA
  first" (kernels/lora.py now) writes the rank-r product, then the base GEMM accumulates onto it (cuBLAS beta=1).
  Also the base GEMM alone, the floor.
- dequant: kernels/nf4.py's dequantize_nf4 of each projection's NF4 weight, in GB/s (packed bytes read + 16-bit
  weight written), against the torch reference.

- dequant sweep (--dequant-sweep): the dequantisation's launch tiling (weights per program x warps), GB/s each.

Appends one JSONL row per case to bench/results/lora_gemm.jsonl and prints them. Usage:

    python bench/bench_lora_gemm.py                                  # a GPU machine
    TRITON_INTERPRET=1 python bench/bench_lora_gemm.py --device cpu --out /tmp/g.jsonl   # functional check
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PROJECTIONS = {"gate_up": (14336, 4096), "down": (4096, 14336), "q_o": (4096, 4096), "k_v": (1024, 4096)}  # (N, K)


def timed_us(f, device: str, reps: int = 20) -> float:
    """Microseconds per call of f(): CUDA events around `reps` calls after 3 warm-up calls (a CPU: one timed call,
    a functional check, not a measurement)."""
    if device != "cuda":
        t = time.perf_counter()
        f()
        return (time.perf_counter() - t) * 1e6
    for _ in range(3):
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def order_rows(device: str, dtype, tokens: list[int], scale: int) -> list[dict]:
    rows = []
    for name, (n, k) in PROJECTIONS.items():
        n, k = n // scale, k // scale
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        b = torch.randn(n, 16, device=device, dtype=dtype) * 0.02
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=dtype)
            xa = torch.randn(m, 16, device=device, dtype=dtype)

            def base_first():
                return torch.mm(x, w.t()).addmm_(xa, b.t(), alpha=2.0)

            def lora_first():
                return torch.mm(xa * 2.0, b.t()).addmm_(x, w.t())

            diff = (base_first().float() - lora_first().float()).abs().max()
            rows.append(dict(case="order", projection=name, tokens=m, n=n, k=k,
                             base_gemm_us=round(timed_us(lambda: torch.mm(x, w.t()), device), 1),
                             base_first_us=round(timed_us(base_first, device), 1),
                             lora_first_us=round(timed_us(lora_first, device), 1), max_abs_diff=float(diff)))
    return rows


def dequant_rows(device: str, dtype, scale: int) -> list[dict]:
    from fasttune.kernels.nf4 import dequantize_nf4
    from fasttune.quant.nf4 import dequantize_nf4_reference, quantize_nf4

    rows = []
    for name, (n, k) in PROJECTIONS.items():
        state = quantize_nf4(torch.randn(n // scale, k // scale, device=device) * 0.02)
        elements = state.packed.numel() * 2
        nbytes = state.packed.numel() + elements * torch.finfo(dtype).bits // 8
        ours = timed_us(lambda: dequantize_nf4(state, dtype), device)
        ref = timed_us(lambda: dequantize_nf4_reference(state, dtype), device)
        same = torch.equal(dequantize_nf4(state, dtype), dequantize_nf4_reference(state, dtype))
        rows.append(dict(case="dequant_nf4", projection=name, n=n // scale, k=k // scale, ours_us=round(ours, 1),
                         reference_us=round(ref, 1), ours_gb_s=round(nbytes / ours / 1e3),
                         bit_equal_reference=bool(same)))
    return rows


def dequant_sweep_rows(device: str, dtype, scale: int) -> list[dict]:
    """dequantize_nf4's launch tiling swept (weights per program x warps) on the gate/up and q/o shapes: GB/s each,
    and whether the result equals the default launch's."""
    from fasttune.kernels.nf4 import dequantize_nf4
    from fasttune.quant.nf4 import quantize_nf4

    rows = []
    for name in ("gate_up", "q_o"):
        n, k = PROJECTIONS[name]
        state = quantize_nf4(torch.randn(n // scale, k // scale, device=device) * 0.02)
        nbytes = state.packed.numel() + state.packed.numel() * 2 * torch.finfo(dtype).bits // 8
        want = dequantize_nf4(state, dtype)
        for per_program in (1024, 2048, 4096, 8192, 16384):
            for warps in (2, 4, 8, 16):
                def run():
                    return dequantize_nf4(state, dtype, per_program, warps)
                us = timed_us(run, device)
                rows.append(dict(case="dequant_sweep", projection=name, weights_per_program=per_program,
                                 num_warps=warps, us=round(us, 1), gb_s=round(nbytes / us / 1e3),
                                 same=bool(torch.equal(run(), want))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_gemm.jsonl"))
    parser.add_argument("--dequant-sweep", action="store_true",
                        help="only the NF4 dequantisation's launch tiling, swept (weights per program x warps)")
    args = parser.parse_args()
    import transformers

    on_gpu = args.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    scale = 1 if on_gpu else 64  # a CPU check runs the same code on shapes 64x smaller
    tokens = [4096, 32768] if on_gpu else [64]
    if not on_gpu:
        import os

        os.environ.setdefault("FASTTUNE_KERNELS", "triton")  # the Triton interpreter (TRITON_INTERPRET=1)
    if args.dequant_sweep:
        rows = dequant_sweep_rows(args.device, dtype, scale)
    else:
        rows = order_rows(args.device, dtype, tokens, scale) + dequant_rows(args.device, dtype, scale)
    meta = dict(bench="lora_gemm", device=torch.cuda.get_device_name() if on_gpu else "cpu",
                torch=torch.__version__, transformers=transformers.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **meta}) + "\n")
            print(row)


if __name__ == "__main__":
    main()
