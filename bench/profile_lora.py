"""Where a LoRA training step spends GPU time: torch.profiler over a few steps of bench_lora's setup, top kernels
by CUDA time. Usage on a GPU machine: python bench/profile_lora.py --shape llama-3.1-8b --gc off [--quant nf4]"""
from __future__ import annotations

import argparse

import torch
import bench_lora
from bench_lora import MOE_SHAPES, SHAPES, build_ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="llama-3.1-8b")
    ap.add_argument("--gc", choices=["on", "off", "offload"], default="off")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--expert-lora", action="store_true", help="MoE shapes: LoRA on the experts too (as bench_lora)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="self_cuda_time_total", help="with --ops, e.g. self_cpu_time_total")
    ap.add_argument("--ops", action="store_true", help="group by aten op and input shapes")
    ap.add_argument("--stacks", default="", help="comma-separated aten ops (e.g. aten::copy_,aten::add) whose "
                                                 "Python call sites to list, by CUDA time")
    a = ap.parse_args()
    bench_lora.EXPERT_LORA[0] = a.expert_lora
    torch.manual_seed(0)
    model = build_ours(a.shape, a.gc, 16, a.quant)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ids = torch.randint(0, {**SHAPES, **MOE_SHAPES}[a.shape]["vocab_size"], (a.bs, a.seq), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    cpu = a.ops or a.stacks
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if cpu else [])
    with torch.profiler.profile(activities=acts, record_shapes=a.ops, with_stack=bool(a.stacks)) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    if a.stacks:
        _print_stacks(prof, a.stacks.split(","))
    elif a.ops:  # aten ops with their input shapes: which call launches the expensive kernels
        by_shape = "cuda" in a.sort  # CPU time: one row per op, all shapes together
        print(prof.key_averages(group_by_input_shape=by_shape).table(sort_by=a.sort, row_limit=a.top,
                                                                 max_name_column_width=40, max_shapes_column_width=90))
    else:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70))


def _print_stacks(prof, names):
    """Where each named op is called from (our frames only), with its CUDA time: finds stray copies and adds."""
    rows = [e for e in prof.key_averages(group_by_stack_n=12) if e.key in names]
    rows.sort(key=lambda e: -e.device_time_total)
    for e in rows[:30]:
        frames = [f for f in e.stack if "fasttune" in f or "bench" in f][:5]
        print(f"{e.key:<16} {e.device_time_total / 1e3:9.2f} ms  {e.count:6d} calls")
        for f in frames:
            print("      ", f)


if __name__ == "__main__":
    main()
