"""The LM head's per-token log-probs (DPO / KTO / GRPO), timed alone on a head shape: the fused path, whose forward
takes each chunk's statistics in one pass of kernels/logit_stats.py's row kernel, against the torch reference
(log_softmax of an fp32 copy per chunk under checkpoint), with and without a gradient; with DPO's outputs
(entropy and the extras: mean logit, first-argmax hit, log sum p^2) and without; and the head's GEMM alone.

Appends one JSONL row per case to bench/results/token_logprobs.jsonl and prints them. Usage:

    python bench/bench_token_logprobs.py                       # a GPU machine; Llama-3.2-1B's head, 3,072 tokens
    TRITON_INTERPRET=1 python bench/bench_token_logprobs.py --device cpu --tokens 64 --vocab 1000 --hidden 64 \\
        --out /tmp/t.jsonl                                     # functional check
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fasttune.kernels.token_logprobs import token_logprobs


def timed_ms(f, device: str, reps: int = 10) -> float:
    """Milliseconds per call of f() after 3 warm-up calls (one call on a CPU: a functional check)."""
    for _ in range(3 if device == "cuda" else 1):
        f()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps if device == "cuda" else 1):
        f()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / (reps if device == "cuda" else 1) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=3072, help="scored tokens (DPO 1B bench: 2 pairs x 2 x 768)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "token_logprobs.jsonl"))
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    h = (torch.randn(a.tokens, a.hidden, device=a.device) * 0.5).to(dtype)
    w = (torch.randn(a.vocab, a.hidden, device=a.device) * 0.02).to(dtype)
    y = torch.randint(0, a.vocab, (a.tokens,), device=a.device)

    def with_grad(extras: bool):
        hg = h.detach().requires_grad_()
        ex = torch.zeros(a.tokens, 3, device=a.device) if extras else None
        lp, ent = token_logprobs(hg, w, y, entropy=True, extras=ex)
        lp.sum().backward()

    def no_grad():
        with torch.no_grad():
            token_logprobs(h, w, y)

    cases = []
    for kernels in ("", "torch"):
        os.environ["FASTTUNE_KERNELS"] = kernels
        path = "torch reference" if kernels else "fused"
        cases += [(f"{path}: forward + backward, entropy + extras", timed_ms(lambda: with_grad(True), a.device)),
                  (f"{path}: forward + backward, entropy", timed_ms(lambda: with_grad(False), a.device)),
                  (f"{path}: no gradient (reference pass)", timed_ms(no_grad, a.device))]
    os.environ["FASTTUNE_KERNELS"] = ""
    cases.append(("head GEMM alone", timed_ms(lambda: h @ w.t(), a.device)))
    import transformers

    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    with open(a.out, "a") as f:
        for name, ms in cases:
            row = {"bench": "token_logprobs", "case": name, "tokens": a.tokens, "hidden": a.hidden,
                   "vocab": a.vocab, "dtype": str(dtype).removeprefix("torch."), "ms": round(ms, 3), "card": card,
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            f.write(json.dumps(row) + "\n")
            print(f"{name:50s} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
