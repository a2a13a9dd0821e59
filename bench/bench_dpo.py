"""DPO and ORPO training throughput and peak memory: fasttune vs TRL + PEFT, same GPU, same run.

Random-init bf16 weights of the Llama-3.2-1B shape built on the GPU (no downloads), LoRA r16 on the 7 projections,
gradient checkpointing on both sides. Data: a few synthetic preference pairs of random words, cycled so the loss
must fall, tokenized by a word-level tokenizer built in-process (one word = one token, so every row has exactly
prompt_len + completion_len tokens on both sides and no padding). TRL side: trl.DPOTrainer and
trl.experimental.orpo.ORPOTrainer given a transformers LlamaForCausalLM and a peft LoraConfig. Each (impl, method,
checkpointing) runs in its own process for a clean peak-memory reading; every run asserts grad-norm > 0 and a falling
loss, then appends a JSONL row to bench/results/preference.jsonl. Usage on a GPU machine:

    python bench/bench_dpo.py --matrix default                        # both methods, both impls, 1B shape
    python bench/bench_dpo.py --impl ours --method orpo --gc off       # a single row
    python bench/bench_dpo.py --smoke                                 # tiny CPU run of the whole matrix (a test)

tok/s counts every token of the chosen and rejected sequences (prompt + completion, both sides) of the timed steps,
the same number for both impls; time = wall time from the end of the last warmup step to the end of the last step,
read after torch.cuda.synchronize() in a per-step hook (TRL: a TrainerCallback's on_step_end; ours: step_metrics,
which the loop calls after each optimizer step, with logging_steps=1 on both sides).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import ROPE, SHAPES, TARGETS, _gc_mode, hf_config, run_row  # noqa: E402

# The smoke shape: hidden 64, 2 layers, as in the tests; not in bench_lora's SHAPES (it is CPU/fp32 only).
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
# (impl, method, gradient checkpointing); ratios are taken against the TRL row of the same method.
MATRIX = {
    "default": [("trl", "dpo", "on"), ("ours", "dpo", "on"), ("ours", "dpo", "off"),
                ("trl", "orpo", "on"), ("ours", "orpo", "on"), ("ours", "orpo", "off")],
}
# DPO's loss is a sigmoid of log-ratios summed over ~768 completion tokens: at 2e-4 it reaches ~1e-14 (zero gradients)
# within 12 steps on the H200, so DPO gets a lower rate that keeps the curve informative (0.693 -> ~0.48).
LR = {"dpo": 2e-5, "orpo": 2e-4}
SMOKE_LR = 2e-4  # the tiny model needs the higher rate for its loss to move in 5 steps
N_ROWS = 4  # distinct pairs, cycled: 2 batches of 2, each seen ~6 times in 12 steps, so the loss must fall


def model_config(shape: str):
    if shape != "tiny":
        return hf_config(shape)
    from transformers import LlamaConfig

    return LlamaConfig(**TINY, max_position_embeddings=4096, rope_parameters=dict(ROPE), rope_scaling=dict(ROPE),
                       rms_norm_eps=1e-5)


def word_tokenizer(n_words: int):
    """One token per word ("w0".."w{n-1}" = ids 0..n-1), then <eos> (also the pad) and <unk>; no BOS, no merges,
    so prompt + completion tokenizes to exactly the prompt's tokens followed by the completion's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_words)}
    vocab.update({"<eos>": n_words, "<unk>": n_words + 1})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<eos>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>", model_max_length=1 << 20)


def preference_rows(n_words: int, prompt_len: int, completion_len: int, n: int = N_ROWS) -> list[dict]:
    """Text rows of random words; completions are one word short: both trainers append the EOS token."""
    rng = random.Random(0)

    def words(k):
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(k))

    return [{"prompt": words(prompt_len), "chosen": " " + words(completion_len - 1),
             "rejected": " " + words(completion_len - 1)} for _ in range(n)]


def build_ours(shape: str, gc: str, r: int, device: str, dtype):
    """bench_lora.build_ours (CUDA + bf16 only there) with the device and dtype as arguments, for the CPU smoke."""
    import torch

    from fasttune.api import FastLanguageModel
    from fasttune.models.causal_lm import CausalLM

    torch.set_default_dtype(dtype)  # build in the training dtype directly: no fp32 copy of the weights on the card
    with torch.device(device):
        model = CausalLM(model_config(shape))
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # transformers' init (normal, std = initializer_range) so both start from alike weights
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.lora_settings = None
    return FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, use_gradient_checkpointing=_gc_mode(gc))


def build_trl_base(shape: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype, attn_implementation="sdpa")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(method, shape, gc, rows, tok, a, device, dtype, out_dir):
    """(losses, grad norms, step end times, peak bytes or None) of fasttune's trainer."""
    import torch

    from fasttune import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer

    base_cls, cfg_cls = (DPOTrainer, DPOConfig) if method == "dpo" else (ORPOTrainer, ORPOConfig)
    ends = []

    class Timed(base_cls):
        def step_metrics(self):  # called once per optimizer step (logging_steps=1), after the update
            _sync()
            ends.append(time.perf_counter())
            return super().step_metrics()

    torch.manual_seed(0)
    model = build_ours(shape, gc, a.r, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # after building: the peak still holds the weights, not init transients
    args = cfg_cls(output_dir=out_dir, per_device_train_batch_size=a.bs, gradient_accumulation_steps=1,
                   max_steps=a.warmup + a.steps, learning_rate=a.lr, logging_steps=1, save_steps=0,
                   max_seq_length=a.prompt_len + a.completion_len, bf16=dtype == torch.bfloat16, report_to="none")
    trainer = Timed(model=model, tokenizer=tok, train_dataset=rows, args=args)
    lengths = [(len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"]))
               for ex in trainer.train_examples]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    trainer.train()
    hist = [h for h in trainer.log_history if "loss" in h]
    if device == "cuda":
        # The loop resets the peak counter per phase and logs each phase's peak: take the largest of them all.
        phases = [v * 2**30 for h in hist for k, v in h.items() if k.startswith("memory/") and k.endswith("_peak_gib")]
        peak = max([peak, torch.cuda.max_memory_allocated(), *phases])
    return lengths, [h["loss"] for h in hist], [h["grad_norm"] for h in hist], ends, peak


def run_trl(method, shape, gc, rows, tok, a, device, dtype, out_dir):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    if method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as TrainerCls
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "experimental" notice
            from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as TrainerCls
    if gc != "on":
        raise SystemExit("the TRL side runs with gradient checkpointing on only (the brief's baseline)")
    ends = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # after the optimizer step, as ours
            _sync()
            ends.append(time.perf_counter())

    torch.manual_seed(0)
    model = build_trl_base(shape, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bf16 = dtype == torch.bfloat16
    args = Config(output_dir=out_dir, per_device_train_batch_size=a.bs, gradient_accumulation_steps=1,
                  max_steps=a.warmup + a.steps, learning_rate=a.lr, logging_steps=1, save_strategy="no",
                  report_to="none", bf16=bf16, gradient_checkpointing=True, use_cpu=device == "cpu",
                  seed=3407, max_length=a.prompt_len + a.completion_len)  # no truncation
    lora = LoraConfig(r=a.r, lora_alpha=a.r, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = TrainerCls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[StepEnds()])
    ds = trainer.train_dataset
    if method == "dpo":
        lengths = [(len(t["prompt_ids"]), len(t["chosen_ids"]), len(t["rejected_ids"])) for t in ds]
    else:
        lengths = [(len(t["prompt_input_ids"]), len(t["chosen_input_ids"]) - len(t["prompt_input_ids"]),
                    len(t["rejected_input_ids"]) - len(t["prompt_input_ids"])) for t in ds]
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return lengths, [h["loss"] for h in hist], [h["grad_norm"] for h in hist], ends, peak


def run_one(impl: str, method: str, gc: str, a) -> dict:
    import peft
    import torch
    import transformers
    import trl

    shape = "tiny" if a.smoke else a.shape
    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    n_words = min(1000, model_config(shape).vocab_size) - 2  # + <eos>, <unk>: every id fits the embedding
    tok = word_tokenizer(n_words)
    rows = preference_rows(n_words, a.prompt_len, a.completion_len)
    with tempfile.TemporaryDirectory() as out_dir:
        lengths, losses, norms, ends, peak = (run_ours if impl == "ours" else run_trl)(
            method, shape, gc, rows, tok, a, device, dtype, out_dir)
    # Both trainers must see exactly the rows the token count assumes (no truncation, no BOS, EOS appended).
    want = (a.prompt_len, a.completion_len, a.completion_len)
    assert all(t == want for t in lengths), f"{impl} tokenized the pairs as {set(lengths)}, expected {want}"
    total = a.warmup + a.steps
    assert len(losses) == total and len(norms) == total and len(ends) == total, (len(losses), len(norms), len(ends))
    assert min(norms) > 0, f"grad norm was 0: {norms}"
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    elapsed = ends[-1] - ends[a.warmup - 1] if a.warmup else ends[-1] - ends[0]
    timed = a.steps if a.warmup else a.steps - 1
    tokens_per_step = a.bs * 2 * (a.prompt_len + a.completion_len)  # chosen + rejected rows, prompt included
    return {"bench": "preference", "impl": impl, "method": method, "gradient_checkpointing": gc,
            "kernels": (os.environ.get("FASTTUNE_KERNELS") or "default") if impl == "ours" else "-",
            "shape": shape, "dtype": str(dtype).removeprefix("torch."), "lora_r": a.r, "batch_pairs": a.bs,
            "prompt_len": a.prompt_len, "completion_len": a.completion_len,
            "seq": a.prompt_len + a.completion_len, "tokens_per_step": tokens_per_step, "steps": a.steps,
            "warmup": a.warmup, "learning_rate": a.lr,
            "tokens_per_second": round(tokens_per_step * timed / elapsed, 1),
            "peak_gib": round(peak / 2**30, 3) if peak is not None else None,
            "loss_first": losses[0], "loss_last": losses[-1], "grad_norm_min": min(norms),
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", choices=sorted(MATRIX))
    ap.add_argument("--smoke", action="store_true",
                    help="tiny llama on the CPU in fp32, short rows, the whole matrix, to a temp JSONL")
    ap.add_argument("--impl", choices=["ours", "trl"], default="ours")
    ap.add_argument("--method", choices=["dpo", "orpo"], default="dpo")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--gc", choices=["on", "off", "offload"], default="on")
    ap.add_argument("--bs", type=int, default=2, help="pairs per device batch (2 x bs rows per forward)")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens (default 256; smoke 16)")
    ap.add_argument("--completion-len", type=int, default=None, help="tokens incl. EOS (default 768; smoke 24)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help=f"default per method {LR}; smoke {SMOKE_LR}")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSONL to append to (default bench/results/preference.jsonl)")
    a = ap.parse_args()
    small = a.smoke
    a.prompt_len = a.prompt_len or (16 if small else 256)
    a.completion_len = a.completion_len or (24 if small else 768)
    a.steps = a.steps or (3 if small else 10)
    if a.smoke and a.out is None:
        a.out = str(Path(tempfile.gettempdir()) / "fasttune_bench_preference_smoke.jsonl")
    a.out = a.out or str(Path(__file__).parent / "results" / "preference.jsonl")
    if a.matrix or (a.smoke and not _single_row_flags()):
        rows = []
        for impl, method, gc in MATRIX[a.matrix or "default"]:
            row = _subprocess_row(a, impl, method, gc)
            if row is not None:
                rows.append(row)
        print_table(rows)
        if a.smoke:
            print(f"(smoke rows appended to {a.out})")
        if len(rows) < len(MATRIX[a.matrix or "default"]):
            sys.exit(1)
        return
    a.lr = a.lr or (SMOKE_LR if a.smoke else LR[a.method])
    row = run_one(a.impl, a.method, a.gc, a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def _single_row_flags() -> bool:
    return any(x in sys.argv for x in ("--impl", "--method"))


def _subprocess_row(a, impl, method, gc):
    """One configuration in a fresh process (clean peak memory); None when it failed (e.g. out of memory)."""
    cmd = [sys.executable, __file__, "--impl", impl, "--method", method, "--gc", gc, "--shape", a.shape,
           "--bs", str(a.bs), "--prompt-len", str(a.prompt_len), "--completion-len", str(a.completion_len),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--r", str(a.r), "--out", a.out]
    if a.lr:
        cmd += ["--lr", str(a.lr)]
    if a.smoke:
        cmd.append("--smoke")
    return run_row(cmd, None, f"{impl} {method} gc={gc}")


def print_table(rows):
    print(f"\n{'impl':<5} {'method':<6} {'gc':<4} {'tok/s':>9} {'peak GiB':>9} {'vs trl':>7} {'mem vs trl':>10} "
          f"{'loss first->last':>18}  card")
    base = {(r["shape"], r["method"]): r for r in rows if r["impl"] == "trl"}
    for r in rows:
        b = base.get((r["shape"], r["method"]))
        speed = r["tokens_per_second"] / b["tokens_per_second"] if b else float("nan")
        mem = r["peak_gib"] / b["peak_gib"] if b and r["peak_gib"] and b["peak_gib"] else float("nan")
        peak = f"{r['peak_gib']:>9.2f}" if r["peak_gib"] is not None else f"{'-':>9}"
        losses = f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"
        print(f"{r['impl']:<5} {r['method']:<6} {r['gradient_checkpointing']:<4} {r['tokens_per_second']:>9,.0f} "
              f"{peak} {speed:>7.2f} {mem:>10.2f} {losses:>18}  {r['card']}")


if __name__ == "__main__":
    main()
