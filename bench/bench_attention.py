"""Causal attention forward + backward per SDPA backend (cuDNN, flash, memory-efficient), flash attention's
varlen kernel, and flash-attn-4's CuTe kernels (`flash_attn.cute`, only when that package is installed), on one
GPU, for the attention shapes of the LoRA benchmark: which exact path is fastest here. With --window W, causal
sliding-window attention instead: SDPA with the dense (T x T) mask (what transformers' SDPA path and fasttune before
models/window_attention.py ran), fasttune's banded SDPA blocks, flash's window kernel, and what fasttune picks.

Each backend gets the same bf16 q/k/v (B, T, H, D layout viewed as SDPA wants it, GQA as the models have it);
outputs are checked against the first backend (max abs difference), timings are the median of 20 runs after
warm-up, and rows are appended to bench/results/attention.jsonl. Usage on a GPU machine:

    python bench/bench_attention.py                    # bs 2 x 2048
    python bench/bench_attention.py --bs 1 --seq 32768 --shapes llama-3.1-8b
    python bench/bench_attention.py --bs 1 --seq 16384 --window 1024 --shapes gemma-3-4b gemma-4-31b-full
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# q heads, kv heads, head dim (Gemma 4 31B: its sliding layers' heads, and its full layers' 512-channel ones)
SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128), "gemma-3-4b": (8, 4, 256),
          "gemma-4-31b-sliding": (32, 16, 256), "gemma-4-31b-full": (32, 4, 512)}


def _windowed(kind: str, window: int):
    """Sliding-window attention on (B, T, H, D) tensors: "dense-mask", "banded", "flash-window" or "fasttune"."""
    from fasttune.models import window_attention as wa

    def run(q, k, v):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, q.shape[-1] ** -0.5)
        fn = {"dense-mask": wa.sliding_window_reference, "banded": wa.banded_attention,
              "flash-window": wa._flash_window, "fasttune": wa.sliding_window_attention}[kind]
        return fn(*args).transpose(1, 2)
    return run


def _sdpa(backend):
    """SDPA restricted to one backend; None: SDPA's own choice (what the decoder gets)."""
    def run(q, k, v):
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return run


def _varlen(q, k, v):
    from fasttune.models.varlen import PackedSpans, varlen_attention

    b, t = q.shape[:2]
    cu = torch.arange(0, (b + 1) * t, t, device=q.device, dtype=torch.int32)  # one document per row
    return varlen_attention(q, k, v, PackedSpans(cu, t), None, q.shape[-1] ** -0.5)


def _fa4():
    """flash-attn-4's causal attention (q (B, T, Hq, D), k/v (B, T, Hkv, D), GQA native), or None when the
    package is not installed. Its first call per shape compiles the kernels (seconds), inside the warm-up."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None

    def run(q, k, v):
        out = flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return run


def _time(fn, q, k, v, grad):
    def once():
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(grad)

    for _ in range(3):
        once()
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES)[:2], choices=list(SHAPES))
    ap.add_argument("--window", type=int, help="sliding-window attention of this many keys (query included)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.jsonl"))
    a = ap.parse_args()
    paths = {"cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION), "flash": _sdpa(SDPBackend.FLASH_ATTENTION),
             "efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION), "default": _sdpa(None),
             "varlen": _varlen}
    if _fa4() is not None:
        paths["fa4"] = _fa4()
    if a.window:
        paths = {kind: _windowed(kind, a.window) for kind in ("dense-mask", "banded", "flash-window", "fasttune")}
    print(f"{'shape':<14} {'path':<10} {'fwd+bwd ms':>10} {'TFLOP/s':>8} {'max diff':>9}  card")
    for shape in a.shapes:
        hq, hk, d = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(a.bs, a.seq, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for h in (hq, hk, hk))
        grad = torch.randn(a.bs, a.seq, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        # the scores each query needs (causal: about half of T x T; a window: at most W each); backward ~2.5x forward
        seen = sum(min(i + 1, a.window or a.seq) for i in range(a.seq))
        flops = 3.5 * 4 * a.bs * seen * hq * d
        first = None
        for name, fn in paths.items():
            try:
                out = fn(q, k, v).detach()
                ms = _time(fn, q, k, v, grad) * 1e3
            except RuntimeError as e:  # a backend that does not take this shape/card
                print(f"{shape:<14} {name:<10} {'-':>10} {'-':>8} {'-':>9}  unavailable: {str(e)[:60]}")
                continue
            first = out if first is None else first
            diff = float((out.float() - first.float()).abs().max())
            row = {"bench": "attention", "shape": shape, "path": name, "batch": a.bs, "seq": a.seq, "window": a.window,
                   "fwd_bwd_ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "max_diff": diff,
                   "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if name == "fa4":
                from importlib.metadata import version
                row["flash_attn_4"] = version("flash-attn-4")
            print(f"{shape:<14} {name:<10} {ms:>10.3f} {row['tflops']:>8.1f} {diff:>9.2e}  {row['card']}")
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
