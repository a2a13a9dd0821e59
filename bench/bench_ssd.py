"""One Mamba-2 mixer (in_proj, conv, the selective scan, the gated norm, out_proj) forward and forward + backward, on
one GPU, per implementation: transformers' layer as it runs without mamba_ssm (its torch scan:
GraniteMoeHybridMambaLayer / NemotronHMamba2Mixer), ours with the torch within-chunk products (FASTTUNE_SSD=torch)
and ours with the fused within-chunk kernels (kernels/ssd_chunk.py, the default). All three hold the same bf16
weights (ours loaded from transformers' state dict); outputs are compared with transformers' (relative Frobenius
error), peak memory is the forward + backward's. Timings are medians of 10 runs after 3 warm-ups; rows go to
bench/results/ssd.jsonl. Shapes: Granite-4.0-H-micro's mixer (64 heads of 64, one group) and Nemotron-Nano-9B-v2's
(128 heads of 80, 8 groups), bs 2 x 2048. Usage:

    python bench/bench_ssd.py                          # on a GPU machine
    python bench/bench_ssd.py --device cpu --tiny      # functional check on a CPU (ours: the torch form only)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "granite-4.0-h-micro": ("GraniteMoeHybridConfig", dict(hidden_size=2048, mamba_n_heads=64, mamba_d_head=64,
                                                           mamba_n_groups=1, mamba_d_state=128, mamba_expand=2)),
    "nemotron-nano-9b-v2": ("NemotronHConfig", dict(hidden_size=4480, mamba_num_heads=128, mamba_head_dim=80,
                                                    n_groups=8, ssm_state_size=128)),
    "tiny": ("GraniteMoeHybridConfig", dict(hidden_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2,
                                            mamba_d_state=16, mamba_expand=2)),
}


def _config(shape: str):
    import transformers

    name, fields = SHAPES[shape]
    common = dict(vocab_size=1000, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    if name == "NemotronHConfig":
        common.update(layers_block_type=["mamba"], intermediate_size=64)
    else:
        common.update(layer_types=["mamba"], shared_intermediate_size=64, num_local_experts=0)
    return getattr(transformers, name)(**common, **fields)


def _mixers(shape: str, device: str):
    """(transformers' mixer, ours) with the same bf16 (CPU: fp32) weights."""
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    from fasttune.models.config import ModelConfig
    from fasttune.models.mamba2 import Mamba2Mixer

    config = _config(shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cls = NemotronHMamba2Mixer if config.model_type == "nemotron_h" else GraniteMoeHybridMambaLayer
    theirs = cls(config, layer_idx=0).to(device, dtype)
    with torch.no_grad():
        theirs.A_log.copy_(torch.log(torch.rand_like(theirs.A_log.float()) * 15 + 1))
        theirs.dt_bias.copy_(torch.rand_like(theirs.dt_bias.float()) * 2 - 4)
    ours = Mamba2Mixer(ModelConfig.from_hf(config), 0).to(device, dtype)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"our mixer lacks {missing} from transformers' state dict")
    return theirs, ours


def _time(fn, backward: bool, device: str) -> tuple[float, float]:
    """(median ms, peak GiB) of fn() (and its backward) over 10 runs after 3."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(13):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        out = fn()
        if backward:
            out.float().square().mean().backward()
        sync()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0
    return statistics.median(times), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape only (functional check)")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ssd.jsonl"))
    a = ap.parse_args()
    shapes = ["tiny"] if a.tiny else ["granite-4.0-h-micro", "nemotron-nano-9b-v2"]
    rows = []
    for shape in shapes:
        theirs, ours = _mixers(shape, a.device)
        hidden = theirs.in_proj.in_features
        x = torch.randn(a.bs, a.seq, hidden, device=a.device, dtype=theirs.in_proj.weight.dtype) * 0.5
        with torch.no_grad():
            want = theirs(x).float()
        for impl, ssd in (("transformers", None), ("ours", "torch"), ("ours-fused", "triton")):
            if ssd is not None:
                os.environ["FASTTUNE_SSD"] = ssd
            model = theirs if ssd is None else ours
            call = (lambda m=model: m(x)) if ssd is None else (lambda m=model: m(x, None, None, {}))
            with torch.no_grad():
                err = ((call().float() - want).norm() / want.norm()).item()
            leaf = x.detach().requires_grad_()
            run = (lambda m=model: m(leaf)) if ssd is None else (lambda m=model: m(leaf, None, None, {}))
            fwd, _ = _time(run, False, a.device)  # (a training forward: the graph is built)
            both, peak = _time(run, True, a.device)
            row = {"bench": "ssd", "impl": impl, "shape": shape, "batch": a.bs, "seq": a.seq,
                   "forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3), "peak_gib": round(peak, 3),
                   "rel_err_vs_transformers": err, "device": torch.cuda.get_device_name() if a.device == "cuda"
                   else "cpu", "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            rows.append(row)
            print(json.dumps(row), flush=True)
        os.environ.pop("FASTTUNE_SSD", None)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{'shape':22} {'impl':14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GiB':>9} {'rel err':>9}")
    for r in rows:
        print(f"{r['shape']:22} {r['impl']:14} {r['forward_ms']:9.2f} {r['forward_backward_ms']:11.2f} "
              f"{r['peak_gib']:9.2f} {r['rel_err_vs_transformers']:9.1e}")


if __name__ == "__main__":
    main()
