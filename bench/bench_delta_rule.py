"""The gated delta rule of one Qwen3.5 DeltaNet layer, forward and forward + backward, per implementation, on one
GPU: transformers' torch form (`torch_chunk_gated_delta_rule`, what transformers runs without
flash-linear-attention), ours with the chunk scan as a torch loop, ours with the Triton scan at each tile
configuration (`FASTTUNE_DELTA_SCAN=bv,warps,stages,precision`; empty: the default), and the work inside the chunks
in torch ops against the fused Triton kernels at a few tile configurations (`FASTTUNE_DELTA_CHUNK=torch` or
`block,warps,stages`; empty: the default, the kernels wherever the scan is Triton). torch's own TF32 switch stays
off: ours turns TF32 on around its products for 16-bit inputs (kernels/tf32.py).

Inputs are bf16 q/k/v and beta and fp32 log-decay at Qwen3.5-9B's linear-layer shape (16 key heads, 32 value heads,
head size 128); outputs and dq are compared with ours on fp32 copies of the inputs (IEEE products throughout;
relative Frobenius error). Timings are medians of 10 runs after warm-up; rows go to bench/results/delta_rule.jsonl; the fastest configuration's GPU
kernels are then listed (torch.profiler). Usage on a GPU machine:

    python bench/bench_delta_rule.py                  # bs 2 x 2048
    python bench/bench_delta_rule.py --bs 1 --seq 8192 --quick
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _inputs(b, t, hk, hv, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(b, t, hk, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(b, t, hv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    decay = -torch.rand(b, t, hv, device="cuda", generator=g) * 0.3
    beta = torch.rand(b, t, hv, device="cuda", generator=g).to(torch.bfloat16)
    return [x.requires_grad_() for x in (q, k, v, decay, beta)]


def _ours(q, k, v, decay, beta):
    from fasttune.models.delta_rule import chunked_delta_rule

    return chunked_delta_rule(q, k, v, decay, beta)[0]


def _transformers(q, k, v, decay, beta):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    group = v.shape[2] // q.shape[2]
    q, k = (x.repeat_interleave(group, dim=2) for x in (q, k))
    return torch_chunk_gated_delta_rule(q, k, v, decay, beta, use_qk_l2norm_in_kernel=True)[0]


@contextlib.contextmanager
def _setting(scan: str, chunk: str = ""):
    """FASTTUNE_DELTA_SCAN and FASTTUNE_DELTA_CHUNK set to `scan` and `chunk`, restored afterwards."""
    names = {"FASTTUNE_DELTA_SCAN": scan, "FASTTUNE_DELTA_CHUNK": chunk}
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _time(fn, inputs, grad, backward: bool, runs: int = 10) -> float:
    """Median milliseconds of fn (with its backward when asked)."""
    def once():
        for x in inputs:
            x.grad = None
        if backward:
            fn(*inputs).backward(grad)
        else:
            with torch.no_grad():
                fn(*inputs)

    for _ in range(2):
        once()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


VARIANTS = {"transformers": _transformers, "ours": _ours}


def measure(a, impl: str, scan: str, chunk: str, profile: bool) -> dict:
    """One variant, in this process: its row (timings and errors against ours in fp32 IEEE); with profile, prints
    its GPU kernels for one forward + backward instead of timing."""
    import transformers

    hk, hv, d = 16, 32, 128  # Qwen3.5-9B's linear layers
    inputs = _inputs(a.bs, a.seq, hk, hv, d)
    grad = torch.randn(a.bs, a.seq, hv, d, device="cuda", dtype=torch.bfloat16)
    exact = [x.detach().float().requires_grad_() for x in inputs]  # fp32 inputs: IEEE products throughout
    with _setting("torch", "torch"):
        ref = _ours(*exact)
        ref_dq = torch.autograd.grad(ref, exact[0], grad.float())[0]
    fn = VARIANTS[impl]
    with _setting(scan, chunk):
        out = fn(*inputs)
        dq = torch.autograd.grad(out, inputs[0], grad)[0]
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn(*inputs).backward(grad)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
            return {}
        fwd = _time(fn, inputs, grad, backward=False)
        both = _time(fn, inputs, grad, backward=True)
    return {"bench": "delta_rule", "impl": impl, "delta_scan": scan, "delta_chunk": chunk, "batch": a.bs,
            "seq": a.seq, "key_heads": hk, "value_heads": hv, "head_dim": d, "forward_ms": round(fwd, 3),
            "forward_backward_ms": round(both, 3), "out_rel_err": _rel(out, ref), "dq_rel_err": _rel(dq, ref_dq),
            "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _child(a, impl, scan, chunk="", profile=False) -> dict | None:
    """One variant in a fresh process (a tile configuration that faults must not poison the others' context)."""
    cmd = [sys.executable, __file__, "--bs", str(a.bs), "--seq", str(a.seq), "--only", f"{impl}:{scan}:{chunk}"]
    proc = subprocess.run(cmd + (["--profile"] if profile else []), capture_output=True, text=True)
    name = f"{impl} scan={scan or 'default'} chunk={chunk or 'default'}"
    if proc.returncode != 0:
        print(f"{name:<56} failed: {proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else ''}",
              flush=True)
        return None
    if profile:
        print(proc.stdout)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name:<56} fwd {row['forward_ms']:7.2f} ms  fwd+bwd {row['forward_backward_ms']:7.2f} ms  "
          f"out err {row['out_rel_err']:.1e}  dq err {row['dq_rel_err']:.1e}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="a few Triton tile configurations instead of the sweep")
    ap.add_argument("--only", help="impl:scan:chunk, e.g. ours:: (one variant in this process; prints its JSON row)")
    ap.add_argument("--profile", action="store_true", help="with --only: list its GPU kernels instead")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "delta_rule.jsonl"))
    a = ap.parse_args()
    if a.only:
        impl, scan, chunk = (a.only + "::").split(":")[:3]
        row = measure(a, impl, scan, chunk, a.profile)
        if row:
            print(json.dumps(row))
        return
    tiles = [(16, 4, 1), (32, 4, 2), (64, 4, 2)] if a.quick else \
        list(itertools.product((16, 32, 64), (4, 8), (1, 2)))
    chunk_tiles = [(64, 8, 1), (32, 4, 1)] if a.quick else \
        [(64, 8, 1), (64, 4, 1), (32, 4, 1), (32, 8, 2), (16, 8, 1), (128, 8, 1)]
    variants = [("transformers", "torch", "torch"), ("ours", "torch", "torch"), ("ours", "", "torch"),
                ("ours", "", "")] + \
        [("ours", "", f"{block},{warps},{stages}") for block, warps, stages in chunk_tiles] + \
        [("ours", f"{bv},{warps},{stages},tf32", "") for bv, warps, stages in tiles] + \
        [("ours", f"{bv},8,1,ieee", "") for bv in (16, 32)]
    rows = [row for row in (_child(a, *v) for v in variants) if row is not None]
    best = min((r for r in rows if r["impl"] == "ours"), key=lambda r: r["forward_backward_ms"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\nfastest of ours: scan={best['delta_scan']} chunk={best['delta_chunk']} "
          f"({best['forward_backward_ms']:.2f} ms fwd+bwd); its kernels:")
    print(f"FASTEST_SCAN={best['delta_scan']}")
    print(f"FASTEST_CHUNK={best['delta_chunk']}")
    _child(a, "ours", best["delta_scan"], best["delta_chunk"], profile=True)


if __name__ == "__main__":
    main()
