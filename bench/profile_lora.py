"""Where a LoRA training step spends GPU time: torch.profiler over a few steps of bench_lora's setup, top kernels
by CUDA time. Usage on a GPU machine: python bench/profile_lora.py --shape llama-3.1-8b --gc off [--quant nf4];
--host checks whether the step is bound by the host instead (the MoE shapes are)."""
from __future__ import annotations

import argparse

import torch
import bench_lora
from bench_lora import MOE_SHAPES, SHAPES, build_ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="llama-3.1-8b")
    ap.add_argument("--gc", choices=["on", "off", "offload"], default="off")
    ap.add_argument("--quant", choices=["none", "nf4", "fp8"], default="none")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--expert-lora", action="store_true", help="MoE shapes: LoRA on the experts too (as bench_lora)")
    ap.add_argument("--offload-embedding", action="store_true", help="ours reads the input embedding from host memory")
    ap.add_argument("--offload-lm-head", action="store_true", help="ours streams the LM head from host memory")
    ap.add_argument("--lean-saves", action="store_true", help="as bench_lora's --lean-saves")
    ap.add_argument("--recompute-layers", type=int, default=None, help="as bench_lora's --recompute-layers")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="self_cuda_time_total", help="with --ops, e.g. self_cpu_time_total")
    ap.add_argument("--ops", action="store_true", help="group by aten op and input shapes")
    ap.add_argument("--host", action="store_true", help="host-bound check instead of a profile: the CPU time to issue "
                                                        "forward and backward, the wait for the GPU after them, and "
                                                        "every synchronising op of one step")
    ap.add_argument("--memory", action="store_true", help="where reserved memory sits instead of a profile: the "
                                                           "allocator's segments by CUDA stream, used and cached")
    ap.add_argument("--growth", action="store_true", help="what makes reserved memory grow: the allocator's "
                                                           "history over the first steps, each new mapping of "
                                                           "device memory by the call site that needed it")
    ap.add_argument("--trace", default="", help="after --host (if given): a chrome trace of one step (CPU ops and "
                                                "kernels) written gzipped to this path, and the GPU's idle time")
    ap.add_argument("--stacks", default="", help="comma-separated aten ops (e.g. aten::copy_,aten::add) whose "
                                                 "Python call sites to list, by CUDA time")
    a = ap.parse_args()
    bench_lora.EXPERT_LORA[0] = a.expert_lora
    bench_lora.OFFLOAD_EMBEDDING[0] = a.offload_embedding
    bench_lora.OFFLOAD_LM_HEAD[0] = a.offload_lm_head
    bench_lora.LEAN_SAVES[0] = a.lean_saves
    bench_lora.RECOMPUTE_LAYERS[0] = a.recompute_layers
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

    if a.growth:
        _growth(step)
        return
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if a.host:
        _host_check(model, ids, step)
    if a.trace:
        _trace(step, a.trace)
    if a.host or a.trace:
        return
    if a.memory:
        _memory_by_stream()
        return
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


def _host_check(model, ids, step):
    """A step is host-bound when the GPU waits for Python to issue its kernels: then "wait" (GPU work still queued
    when backward returns) is near zero, and only fewer or cheaper launches make it faster, not faster kernels."""
    import time
    import traceback
    import warnings

    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        print(f"host: forward {1e3 * (t1 - t0):.1f} ms, backward {1e3 * (t2 - t1):.1f} ms; "
              f"then the GPU {1e3 * (t3 - t2):.1f} ms more")
        model.zero_grad(set_to_none=True)
    sites = {}

    def note(message, *_args, **_kwargs):
        frames = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                  if "fasttune" in f.filename or "bench" in f.filename]
        key = (str(message).split("\n")[0][:100], tuple(frames[-3:]))
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"synchronising ops in one step: {sum(sites.values())}")
    for (message, frames), n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"{n:4d}  {message}")
        for f in frames:
            print("        ", f)


def _memory_by_stream():
    """The caching allocator after the steps: reserved bytes by stream (a block freed on one stream is reused only
    by allocations on that stream), how much of each is in use, and its largest cached block."""
    gib = 2**30
    print(f"peak allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB, peak reserved "
          f"{torch.cuda.max_memory_reserved() / gib:.2f} GiB, now reserved {torch.cuda.memory_reserved() / gib:.2f}")
    streams = {}
    for seg in torch.cuda.memory_snapshot():
        s = streams.setdefault(seg["stream"], {"segments": 0, "reserved": 0, "used": 0, "largest_free": 0})
        s["segments"] += 1
        s["reserved"] += seg["total_size"]
        s["used"] += seg["allocated_size"]
        free = [b["size"] for b in seg["blocks"] if b["state"] == "inactive"]
        s["largest_free"] = max([s["largest_free"], *free])
    for stream, s in sorted(streams.items(), key=lambda kv: -kv[1]["reserved"]):
        print(f"stream {stream:#x}: {s['segments']} segments, {s['reserved'] / gib:.2f} GiB reserved, "
              f"{s['used'] / gib:.2f} in use, largest cached block {s['largest_free'] / gib:.2f}")
    stats = torch.cuda.memory_stats()
    print("allocation retries (cache freed to fit):", stats.get("num_alloc_retries"),
          "; device allocations:", stats.get("num_device_alloc"), "; frees:", stats.get("num_device_free"))


def _trace(step, path: str):
    """One step under torch.profiler (CPU and CUDA), saved as a gzipped chrome trace; prints the step's wall time
    and how long the GPU ran no kernel on any stream (the gaps a host-bound or waiting step leaves)."""
    import gzip
    import os
    import tempfile
    import time

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    first = spans[0][0] if spans else 0
    print(f"trace step: wall {1e3 * wall:.1f} ms, GPU kernels span {(end - first) / 1e3:.1f} ms, "
          f"GPU busy {busy / 1e3:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as f, gzip.open(path, "wb") as out:
            out.write(f.read())


def _growth(step, steps: int = 3):
    """Reserved memory grows when no cached block of the allocating stream fits: replay the allocator's history of
    the first `steps` steps and sum each growth (a new segment, or pages mapped onto an expandable one) by the call
    site that asked for it, with the bytes allocated and reserved at that moment; then the blocks cached at the
    reserved peak by size. Source of the trace format: torch.cuda.memory._snapshot()'s "device_traces"."""
    gib = 2**30
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    starts = []
    for _ in range(steps):
        torch.cuda.synchronize()
        starts.append(torch.cuda.memory_reserved())
        step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print("reserved before each step (GiB):", [round(s / gib, 2) for s in starts],
          "after:", round(torch.cuda.memory_reserved() / gib, 2),
          "peak allocated", round(torch.cuda.max_memory_allocated() / gib, 2))
    trace = [e for dev in snap["device_traces"] for e in dev]
    allocated = reserved = 0
    by_site, growths, live = {}, [], {}
    for e in trace:
        act, size = e["action"], e["size"]
        if act == "alloc":
            allocated += size
            live[e["addr"]] = (size, e.get("stream", 0))
        elif act == "free_completed":
            allocated -= size
            live.pop(e["addr"], None)
        elif act in ("segment_alloc", "segment_map"):
            reserved += size
            frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames", [])
                      if "fasttune" in f["filename"] or "bench" in f["filename"]][:4]
            key = (e.get("stream", 0), tuple(frames))
            n, total = by_site.get(key, (0, 0))
            by_site[key] = (n + 1, total + size)
            growths.append((size, allocated, reserved))
        elif act in ("segment_free", "segment_unmap"):
            reserved -= size
    print(f"{len(growths)} growths, {sum(g[0] for g in growths) / gib:.2f} GiB mapped; the largest 12 "
          "(size, allocated then, reserved after):")
    for size, al, res in sorted(growths, key=lambda g: -g[0])[:12]:
        print(f"   {size / gib:6.2f}  {al / gib:6.2f}  {res / gib:6.2f}")
    print("growth by stream and call site (GiB, count):")
    for (stream, frames), (n, total) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {total / gib:6.2f} GiB {n:4d}x stream {stream:#x}")
        for f in frames:
            print("        ", f)
    _memory_by_stream()
    sizes = {}
    for seg in torch.cuda.memory_snapshot():
        for b in seg["blocks"]:
            if b["state"] == "inactive" and b["size"] >= 2**20:
                key = round(b["size"] / 2**20, -1)
                sizes[key] = sizes.get(key, 0) + 1
    print("cached free blocks now, MiB (rounded) x count:", sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:20])


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
