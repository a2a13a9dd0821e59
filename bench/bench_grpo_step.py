"""GRPO step wall time: fasttune's GRPOTrainer against TRL's GRPOTrainer (transformers generation), same GPU, same run.

Issue #23's "must show": GRPO steps on a Llama-3.2-1B shape, 8 prompts per step x 8 generations x 256 completion
tokens. Random-init weights (no downloads; seeded, so both trainers start from the same base), bf16, LoRA r16 on the
7 projections (PEFT's LoraConfig for TRL, FastLanguageModel.get_peft_model for ours), gradient checkpointing on for
both. The tokenizer is built here (a word-level vocabulary "w3".."w<vocab-1>" covering every id, plus <unk>, <eos>
(= pad) and <bos>), prompts are 64 random words as plain text (64 tokens each), no chat template. Random weights
practically never sample <eos>, so completions run to max_completion_length: the intended, comparable workload.
Reward: the share of a completion's words with an even id (deterministic, cheap, differs within a group, so the
advantages and the grad-norm are non-zero).

Both trainers get the same settings: one optimizer step = per_device_train_batch_size 8 x gradient_accumulation 8 =
64 completions = 8 prompts x num_generations 8, sampled in one generate() call (TRL: steps_per_generation defaults
to gradient_accumulation_steps, so the old log-probs pass is skipped; ours samples the step's prompts at once),
num_iterations 1, beta 0 (no reference model), loss_type dapo, epsilon 0.2, scale_rewards group, temperature 1,
top_p 1, top_k 0, AdamW (fused on CUDA), constant LR 1e-5, max_grad_norm 1.0, bf16.

Each trainer runs in its own process (clean CUDA state and peak memory). Per step: wall time (step end to step end,
synchronized; the first step is a warm-up: CUDA graph capture, autotuning, allocator), the time inside generate()
and its generated positions per second, loss, grad-norm, mean reward and completion length from the trainer's logs.
Every run asserts finite losses and a grad-norm > 0 at every step (GRPO's loss with one iteration is ~0 by
construction, so a falling loss is not asserted). The parent appends one JSONL row per trainer to
bench/results/grpo_step.jsonl and prints a table with the speed-up trl_step_s / step_s. Usage:

    python bench/bench_grpo_step.py                     # GPU: llama-3.2-1b shape, 4 steps (1 warm-up), both rows
    python bench/bench_grpo_step.py --objective rloo    # the same with RLOOTrainer on both sides (beta 0.05)
    python bench/bench_grpo_step.py --objective online_dpo   # OnlineDPOTrainer on both sides (TRL's experimental
        # one): the same 64 completions a step, as 32 prompts x 2 (4 prompts a micro-batch), beta 0.1
    python bench/bench_grpo_step.py --fp32-head on      # both with cast_lm_head_to_fp32=True
    python bench/bench_grpo_step.py --objective distillation   # DistillationTrainer on both sides: the same number
        # of completions (8 x 8 prompts, one completion each), a llama-3.1-8b-shaped teacher (--teacher-shape)
    python bench/bench_grpo_step.py --objective distillation --impls ours --teacher-quant nf4   # an NF4 teacher
    python bench/bench_grpo_step.py --shape llama-3.1-8b --impls ours --quant fp8                # FP8 policy
    python bench/bench_grpo_step.py --impl ours --row-out /tmp/r.json   # one child run (what the parent starts)
    OMP_NUM_THREADS=1 python bench/bench_grpo_step.py --shape tiny --device cpu --steps 2 --completion-len 8 \
        --out /tmp/grpo_step.jsonl                      # functional check on a CPU
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import SHAPES, init_experts, ours_config, shape_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNK, EOS, BOS = 0, 1, 2  # special ids; pad = eos (the stop ids are then the same for both trainers: {eos})
FIRST_WORD = 3


def build_tokenizer(vocab: int):
    """A word-level tokenizer whose vocabulary covers every model id: "w<id>" for ids >= 3, whitespace split, decode
    joins words with spaces (the special tokens are skipped)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": UNK, "<eos>": EOS, "<bos>": BOS, **{f"w{i}": i for i in range(FIRST_WORD, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>",
                                   pad_token="<eos>", padding_side="left")


def make_prompts(vocab: int, n: int, length: int) -> list[dict]:
    import random

    rng = random.Random(1)
    return [{"prompt": " ".join(f"w{rng.randrange(FIRST_WORD, vocab)}" for _ in range(length))} for _ in range(n)]


def even_ids(completions, **kwargs) -> list[float]:
    """The share of a completion's words whose id is even (0 for an empty completion)."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


def build_hf(shape: str, device: str, seed: int = 0):
    """transformers' model of the shape (Llama, or bench_generate's MoE shapes), random-init from `seed`, bf16 on
    CUDA (fp32 on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = shape_config(shape, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    init_experts(model)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    return model, cfg, dtype


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def clock_generate(model, device: str, record: list):
    """Wrap model.generate (an instance attribute shadows the method): append (seconds, generated positions) of
    each call, synchronized."""
    inner = model.generate

    def generate(*args, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        _sync(device)
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        seqs = out if hasattr(out, "shape") else out.sequences
        record.append((time.perf_counter() - t0, int(seqs.shape[0] * (seqs.shape[1] - ids.shape[1]))))
        return out

    model.generate = generate


class StepClock:
    """Step-end timestamps (synchronized) and the generate() time/positions of each step."""

    def __init__(self, device: str, profile_step: int | None = None):
        """profile_step: the index of a step (0-based) to run under torch.profiler; its CUDA kernels are printed."""
        self.device, self.ends, self.gen, self.gen_seconds, self.gen_positions = device, [], [], [], []
        self.profile_step, self.profiler = profile_step, None

    def _profile(self):
        """Start the profiler when the step to profile begins, print its kernel table when it ends."""
        import torch

        step = len(self.ends) - 1  # the step that starts now
        if self.profiler is not None:
            self.profiler.stop()
            print(self.profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                                     max_name_column_width=70), flush=True)
            self.profiler = None
        elif step == self.profile_step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                               torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()

    def start(self):
        _sync(self.device)
        self.ends.append(time.perf_counter())
        self._profile()

    def step_end(self):
        _sync(self.device)
        self.ends.append(time.perf_counter())
        self.gen_seconds.append(sum(s for s, _ in self.gen))
        self.gen_positions.append(sum(n for _, n in self.gen))
        self.gen.clear()
        self._profile()

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def common_fields(a, cuda: bool) -> dict:
    """GRPOConfig (RLOOConfig with --objective rloo) fields both trainers take under the same names and meaning."""
    grpo = getattr(a, "objective", "grpo") == "grpo"
    if getattr(a, "objective", "grpo") == "online_dpo":  # a pair per prompt; per_device_train_batch_size counts prompts
        return dict(per_device_train_batch_size=a.num_generations // 2, gradient_accumulation_steps=a.prompts,
                    max_new_tokens=a.completion_len, max_length=a.prompt_len + a.completion_len + 8,
                    temperature=1.0, top_p=1.0, top_k=0, beta=beta(a), learning_rate=a.lr,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    max_steps=a.steps, logging_steps=1, optim="adamw_torch_fused" if cuda else "adamw_torch",
                    bf16=cuda, seed=3407)
    if getattr(a, "objective", "grpo") == "distillation":  # one completion per prompt: num_generations x as many
        return dict(per_device_train_batch_size=a.num_generations, gradient_accumulation_steps=a.prompts,
                    max_completion_length=a.completion_len, temperature=1.0, top_p=1.0, top_k=0, beta=beta(a),
                    learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, max_steps=a.steps, logging_steps=1,
                    optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, seed=3407)
    return dict(per_device_train_batch_size=a.num_generations, gradient_accumulation_steps=a.prompts,
                num_generations=a.num_generations, max_completion_length=a.completion_len, temperature=1.0,
                top_p=1.0, top_k=0, beta=beta(a), epsilon=0.2, num_iterations=1, mask_truncated_completions=False,
                learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, max_steps=a.steps, logging_steps=1,
                optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, seed=3407,
                cast_lm_head_to_fp32=getattr(a, "fp32_head", "off") == "on",
                **(dict(loss_type="dapo", scale_rewards="group") if grpo else {}))


def beta(a) -> float:
    """--beta, else 0 for GRPO (no reference) and TRL's RLOO default 0.05 (the KL penalty on the rewards)."""
    if getattr(a, "beta", None) is not None:
        return a.beta
    return {"rloo": 0.05, "distillation": 1.0, "online_dpo": 0.1}.get(getattr(a, "objective", "grpo"), 0.0)


def run_trl(a, clock: StepClock, prompts: list[dict], tok, out_dir: str):
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    if a.teacher_quant != "none":
        raise SystemExit("--teacher-quant applies to our trainer only (TRL's NF4 teacher needs bitsandbytes).")
    model, _, _ = build_hf(a.shape, a.device)
    teacher = build_hf(a.teacher_shape, a.device, seed=1)[0].eval() if a.objective == "distillation" else None
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    if a.objective == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        config, trainer_cls = OnlineDPOConfig, OnlineDPOTrainer
    else:
        config, trainer_cls = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
                               "distillation": (trl.DistillationConfig, trl.DistillationTrainer)}[a.objective]
    args = config(output_dir=out_dir, **common_fields(a, a.device == "cuda"), use_vllm=False,
                  gradient_checkpointing=a.gc == "on", save_strategy="no", report_to=[], dataloader_num_workers=0,
                  use_cpu=a.device == "cpu")
    peft_config = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                             task_type="CAUSAL_LM")
    scoring = {"teacher_model": teacher} if teacher is not None else {"reward_funcs": even_ids}
    trainer = trainer_cls(model=model, **scoring, args=args, train_dataset=Dataset.from_list(prompts),
                          processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
    clock_generate(trainer.model, a.device, clock.gen)
    clock.start()
    trainer.train()
    history = trainer.state.log_history
    # TRL 1.16 logs its own per-step wall time (unsynchronized); kept as a cross-check of the clock here.
    return history, {"trl_logged_step_time": [h.get("step_time") for h in history if "loss" in h]}


def run_ours(a, clock: StepClock, prompts: list[dict], tok, out_dir: str):
    import torch

    from fasttune import (DistillationConfig, DistillationTrainer, FastLanguageModel, GRPOConfig, GRPOTrainer,
                          OnlineDPOConfig, OnlineDPOTrainer, RLOOConfig, RLOOTrainer)
    from fasttune.models.loading import build_model

    hf, cfg, dtype = build_hf(a.shape, a.device)
    quant = None if a.quant == "none" else a.quant  # load_in_fp8's layers: TRL's row stays bf16 (no FP8 path)
    model = build_model(ours_config(cfg), hf.state_dict().items(), dtype, a.device, "bench", quant=quant)
    del hf
    teacher = None
    if a.objective == "distillation":
        hf, teacher_cfg, _ = build_hf(a.teacher_shape, a.device, seed=1)
        teacher = build_model(ours_config(teacher_cfg), hf.state_dict().items(), dtype, a.device, "bench")
        del hf
        if a.teacher_quant == "nf4":  # as teacher_model_init_kwargs={"load_in_4bit": True} loads it
            from bench_lora import quantize_linears

            quantize_linears(teacher)
    if a.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.name_or_path = f"random-{a.shape}"
    model = FastLanguageModel.get_peft_model(model, r=a.r, lora_alpha=a.r, target_modules=TARGETS,
                                             use_gradient_checkpointing=a.gc == "on")
    clock_generate(model, a.device, clock.gen)

    config, trainer_cls = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer),
                           "distillation": (DistillationConfig, DistillationTrainer),
                           "online_dpo": (OnlineDPOConfig, OnlineDPOTrainer)}[a.objective]

    class Timed(trainer_cls):
        def _after_step(self, run):
            clock.step_end()
            super()._after_step(run)

    args = config(output_dir=out_dir, **common_fields(a, a.device == "cuda"))
    if teacher is not None:
        trainer = Timed(model, teacher, args=args, train_dataset=prompts, processing_class=tok)
    else:
        trainer = Timed(model, reward_funcs=[even_ids], args=args, train_dataset=prompts, processing_class=tok)
    return train_ours(trainer, clock)


def train_ours(trainer, clock: StepClock) -> tuple[list, dict]:
    """Run our trainer from the clock's start: (its log_history, {"logged_peak_gib": the highest peak it logged}).
    Our trainer logs the peak per phase and restarts the allocator's peak counter for each phase."""
    clock.start()
    trainer.train()
    hist = [h for h in trainer.log_history if "loss" in h]
    peaks = [v for h in hist for k, v in h.items() if k.startswith("memory/") and k.endswith("_peak_gib")]
    return trainer.log_history, {"logged_peak_gib": max(peaks)} if peaks else {}


def child(a) -> dict:
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device; run with --device cpu (and --shape tiny) for a functional check.")
    vocab = SHAPES[a.shape]["vocab_size"]
    tok = build_tokenizer(vocab)
    distill = a.objective == "distillation"  # one completion per prompt: num_generations x as many prompts
    per_step = a.prompts * {"distillation": a.num_generations, "online_dpo": a.num_generations // 2}.get(a.objective, 1)
    prompts = make_prompts(vocab, per_step * a.steps, a.prompt_len)
    clock = StepClock(a.device, a.profile_step)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_trl if a.impl == "trl" else run_ours
        history, extra = run(a, clock, prompts, tok, str(Path(tmp) / "run"))
    logs, steps, losses, grad_norms = checked_steps(history, clock, a.steps)
    timed = steps[a.warmup:] or steps
    gen_s = clock.gen_seconds[a.warmup:] or clock.gen_seconds
    gen_n = clock.gen_positions[a.warmup:] or clock.gen_positions
    peak = None
    if a.device == "cuda":
        peak = round(max(torch.cuda.max_memory_allocated() / 2**30, extra.pop("logged_peak_gib", 0)), 3)
    return {"bench": "grpo_step", "objective": a.objective, "impl": a.impl, "shape": a.shape,
            "prompts_per_step": per_step,
            "num_generations": {"distillation": 1, "online_dpo": 2}.get(a.objective, a.num_generations),
            "max_completion_length": a.completion_len,
            "prompt_len": a.prompt_len, "steps": a.steps, "warmup_steps": a.warmup,
            "step_seconds": round(statistics.median(timed), 4), "each_step_seconds": [round(s, 4) for s in steps],
            "generate_seconds": round(statistics.median(gen_s), 4) if any(gen_s) else None,
            "each_generate_seconds": [round(s, 4) for s in clock.gen_seconds],
            "generated_tokens_per_second": round(sum(gen_n) / sum(gen_s), 1) if any(gen_s) else None,
            "losses": losses, "grad_norms": grad_norms,
            "rewards": [h.get("reward", h.get("objective/scores")) for h in logs],
            "completion_mean_length": [h.get("completions/mean_length") for h in logs],
            "peak_gib": peak, "lora_r": a.r, "gradient_checkpointing": a.gc, "learning_rate": a.lr,
            "beta": beta(a), "cast_lm_head_to_fp32": a.fp32_head == "on",
            "loss_type": {"grpo": "dapo", "rloo": "rloo", "distillation": "gkd", "online_dpo": "sigmoid"}[a.objective],
            "teacher_shape": a.teacher_shape if a.objective == "distillation" else None,
            "teacher_quant": a.teacher_quant if a.objective == "distillation" else None,
            "quant": a.quant if a.impl == "ours" else "none", **run_fields(a.device), **extra}


def run_fields(device: str) -> dict:
    """The row fields naming what ran: dtype, card, torch / transformers / TRL / PEFT versions, commit, time."""
    import torch
    import transformers

    return {"dtype": "bfloat16" if device == "cuda" else "float32",
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": version("trl"), "peft": version("peft"),
            "commit": _commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save_rows(rows: list[dict], out: str) -> None:
    """Each row's speedup_vs_trl (TRL's step time over its own; None without a TRL row), then the rows appended to
    the JSONL file `out`."""
    trl_row = next((r for r in rows if r["impl"] == "trl"), None)
    for r in rows:
        r["speedup_vs_trl"] = round(trl_row["step_seconds"] / r["step_seconds"], 3) if trl_row else None
    if rows:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "trl"], help="child mode: run one trainer, write its row to --row-out")
    ap.add_argument("--impls", default="ours,trl")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps, the first --warmup of them not timed")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--gc", choices=["on", "off"], default="on", help="gradient checkpointing, both trainers")
    ap.add_argument("--objective", choices=["grpo", "rloo", "distillation", "online_dpo"], default="grpo",
                    help="GRPOTrainer, RLOOTrainer, DistillationTrainer or OnlineDPOTrainer")
    ap.add_argument("--teacher-shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                    help="distillation: the teacher's shape (random weights, seed 1)")
    ap.add_argument("--quant", choices=["none", "fp8"], default="none",
                    help="our policy's frozen weights (fp8: load_in_fp8); TRL's stay bf16")
    ap.add_argument("--teacher-quant", choices=["none", "nf4"], default="none",
                    help="distillation, ours only: the teacher's linears in NF4 (load_in_4bit)")
    ap.add_argument("--beta", type=float, default=None, help="KL weight (default: 0 for grpo, 0.05 for rloo)")
    ap.add_argument("--fp32-head", choices=["on", "off"], default="off",
                    help="cast_lm_head_to_fp32 (TRL's / ScaleRL's fp32 LM head), both trainers")
    ap.add_argument("--profile-step", type=int, default=None,
                    help="print the CUDA kernels of this step (0-based; its time then includes the profiler's)")
    ap.add_argument("--row-out", help="child mode: where to write the row (JSON)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_step.jsonl"))
    a = ap.parse_args()
    if run_child(a, child):
        return
    rows = child_rows(__file__, a, ("shape", "device", "steps", "warmup", "prompts", "num_generations",
                                    "completion_len", "prompt_len", "r", "lr", "gc", "objective", "beta",
                                    "fp32_head", "teacher_shape", "teacher_quant", "quant", "profile_step"))
    save_rows(rows, a.out)
    print_table(rows)
    if len(rows) != len(a.impls.split(",")):
        raise SystemExit(1)


def checked_steps(history: list, clock: StepClock, n: int) -> tuple[list, list, list, list]:
    """(the logged steps, their wall seconds, losses, grad-norms) of a run of n steps. Asserts n of each, finite
    losses and a finite grad-norm > 0 at every step."""
    logs = [h for h in history if "loss" in h]
    steps = clock.step_seconds()
    assert len(steps) == n and len(logs) == n, (len(steps), len(logs), n)
    losses = [float(h["loss"]) for h in logs]
    grad_norms = [float(h["grad_norm"]) for h in logs]
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    assert all(math.isfinite(g) and g > 0 for g in grad_norms), f"grad-norm not finite and > 0: {grad_norms}"
    return logs, steps, losses, grad_norms


def run_child(a, child) -> bool:
    """Child mode (--impl given): run child(a), print its row and write it to a.row_out; False in parent mode."""
    if not a.impl:
        return False
    row = child(a)
    print(json.dumps(row), flush=True)
    if a.row_out:
        Path(a.row_out).write_text(json.dumps(row))
    return True


def child_rows(script: str, a, flags: tuple) -> list[dict]:
    """Run `script --impl IMPL --row-out FILE` with the parsed options `flags` for each of a.impls (comma-separated),
    each in its own process (a clean CUDA state and peak memory); the rows the children wrote, in order (a failed
    child is reported and left out)."""
    rows = []
    for impl in a.impls.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            row_file = Path(tmp) / "row.json"
            cmd = [sys.executable, script, "--impl", impl, "--row-out", str(row_file)]
            for flag in flags:
                if getattr(a, flag) is not None:  # (None: the child's own default)
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
            print(f"--- {impl}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not row_file.exists():
                print(f"FAILED {impl} (exit {proc.returncode})", flush=True)
                continue
            rows.append(json.loads(row_file.read_text()))
    return rows


def print_table(rows):
    if not rows:
        return
    r0 = rows[0]
    print(f"\n{r0.get('objective', 'grpo').upper()} step, {r0['shape']}: {r0['prompts_per_step']} prompts x "
          f"{r0['num_generations']} generations x "
          f"{r0['max_completion_length']} tokens, prompt {r0['prompt_len']} tokens, LoRA r{r0['lora_r']}, "
          f"recompute {r0['gradient_checkpointing']}; median of {r0['steps'] - r0['warmup_steps']} steps after "
          f"{r0['warmup_steps']} warm-up; fp32 LM head {r0.get('cast_lm_head_to_fp32', False)}; {r0['card']}")
    print(f"{'impl':<6} {'step s':>8} {'generate s':>11} {'gen tok/s':>10} {'peak GiB':>9} {'vs trl':>7} "
          f"{'reward':>7}  grad norms")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        gen = f"{r['generate_seconds']:.3f}" if r["generate_seconds"] is not None else "-"
        tps = f"{r['generated_tokens_per_second']:,.0f}" if r["generated_tokens_per_second"] is not None else "-"
        vs = f"{r['speedup_vs_trl']:.2f}x" if r["speedup_vs_trl"] is not None else "-"
        rewards = [x for x in r["rewards"] if x is not None]
        reward = f"{sum(rewards) / len(rewards):.3f}" if rewards else "-"
        print(f"{r['impl']:<6} {r['step_seconds']:>8.3f} {gen:>11} {tps:>10} {peak:>9} {vs:>7} {reward:>7}  "
              f"{', '.join(f'{g:.3g}' for g in r['grad_norms'])}")


if __name__ == "__main__":
    main()
