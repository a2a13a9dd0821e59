"""The gated delta rule of one Qwen3.5 DeltaNet layer, forward and forward + backward, per implementation, on one
GPU: transformers' torch form (`torch_chunk_gated_delta_rule`, what transformers runs without
flash-linear-attention), ours with the chunk scan as a torch loop, and ours with the Triton scan at each tile
configuration (`FASTTUNE_DELTA_SCAN=bv,warps,stages,precision`), with fp32 matmuls as IEEE or TF32.

Inputs are bf16 q/k/v and beta and fp32 log-decay at Qwen3.5-9B's linear-layer shape (16 key heads, 32 value heads,
head size 128); outputs and dq are compared with ours in fp32 IEEE throughout (relative Frobenius error). Timings
are medians of 10 runs after warm-up; rows go to bench/results/delta_rule.jsonl; the fastest configuration's GPU
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
def _setting(scan: str, tf32: bool):
    """FASTTUNE_DELTA_SCAN and torch's TF32 switch for fp32 matmuls, restored afterwards."""
    old = os.environ.get("FASTTUNE_DELTA_SCAN"), torch.backends.cuda.matmul.allow_tf32
    os.environ["FASTTUNE_DELTA_SCAN"] = scan
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        if old[0] is None:
            os.environ.pop("FASTTUNE_DELTA_SCAN")
        else:
            os.environ["FASTTUNE_DELTA_SCAN"] = old[0]
        torch.backends.cuda.matmul.allow_tf32 = old[1]


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


def _with_fastest_on_tf32(variants, rows):
    """The variants, then the fastest Triton one measured so far (in rows) again with TF32 fp32 matmuls."""
    yield from variants
    done = [r for r in rows if r["variant"].startswith("ours triton")]
    if done:
        best = min(done, key=lambda r: r["forward_backward_ms"])
        yield f"{best['variant']} mm-tf32", _ours, best["delta_scan"], True


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="a few Triton tile configurations instead of the sweep")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "delta_rule.jsonl"))
    a = ap.parse_args()
    hk, hv, d = 16, 32, 128  # Qwen3.5-9B (and 27B's key heads per value head)
    inputs = _inputs(a.bs, a.seq, hk, hv, d)
    grad = torch.randn(a.bs, a.seq, hv, d, device="cuda", dtype=torch.bfloat16)

    def reference():
        with _setting("torch", False):
            out = _ours(*inputs)
            return out.detach(), torch.autograd.grad(out, inputs[0], grad)[0]

    ref_out, ref_dq = reference()
    variants = [("transformers", _transformers, "torch", False), ("ours torch-loop", _ours, "torch", False),
                ("ours torch-loop tf32", _ours, "torch", True)]
    tiles = [(32, 4, 2), (64, 4, 2), (32, 8, 2)] if a.quick else \
        list(itertools.product((16, 32, 64), (4, 8), (1, 2)))
    for (bv, warps, stages), precision in itertools.product(tiles, ("ieee", "tf32")):
        variants.append((f"ours triton {bv},{warps},{stages},{precision}", _ours, f"{bv},{warps},{stages},{precision}",
                         False))
    import transformers

    rows = []
    for name, fn, scan, tf32 in _with_fastest_on_tf32(variants, rows):
        try:
            with _setting(scan, tf32):
                out = fn(*inputs)
                dq = torch.autograd.grad(out, inputs[0], grad)[0]
                fwd = _time(fn, inputs, grad, backward=False)
                both = _time(fn, inputs, grad, backward=True)
        except Exception as e:  # a tile configuration that does not fit the card (shared memory, registers)
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        row = {"bench": "delta_rule", "variant": name, "delta_scan": scan, "matmul_tf32": tf32, "batch": a.bs,
               "seq": a.seq, "key_heads": hk, "value_heads": hv, "head_dim": d, "forward_ms": round(fwd, 3),
               "forward_backward_ms": round(both, 3), "out_rel_err": _rel(out, ref_out),
               "dq_rel_err": _rel(dq, ref_dq), "card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        rows.append(row)
        print(f"{name:<44} fwd {fwd:7.2f} ms  fwd+bwd {both:7.2f} ms  out err {row['out_rel_err']:.1e}  "
              f"dq err {row['dq_rel_err']:.1e}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    best = min((r for r in rows if r["variant"].startswith("ours")), key=lambda r: r["forward_backward_ms"])
    print(f"\nfastest of ours: {best['variant']} ({best['forward_backward_ms']:.2f} ms fwd+bwd); its kernels:")
    print(f"FASTEST_SCAN={best['delta_scan']}")
    with _setting(best["delta_scan"], best["matmul_tf32"]), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _ours(*inputs).backward(grad)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
