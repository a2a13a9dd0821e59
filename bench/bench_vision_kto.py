"""KTO steps on rows with images: fasttune's KTOTrainer against TRL 1.16's KTOTrainer, same GPU, same run.

bench_vision_grpo.py's model, tokenizer and processors (a random-init Qwen2.5-VL-7B shape, the same weights on both
sides, bf16, LoRA r16 on the language model's 7 projections, vision tower frozen, recompute on). Each row: one
448 x 448 image of random pixels and `prompt_len` random words as the prompt, `completion_len` random words as the
completion, labels alternating desirable / undesirable. A step: `batch` rows (loss_type kto, beta 0.1: the KL rows
are the prompts with the completions rotated by one, as TRL pairs them within its batch), fused AdamW at a constant
1e-5, clipping 1.0. Each trainer in its own process; per step the synchronized wall time (the first `warmup` steps
not timed); tokens/s counts the rows' prompt + completion tokens. Asserts finite losses, grad-norm > 0 and a falling
loss on the first step's rows (the rows are cycled); appends one JSONL row per trainer to
bench/results/vision_kto.jsonl and prints the table.

    python bench/bench_vision_kto.py                             # GPU: qwen2.5-vl-7b, ours and trl
    OMP_NUM_THREADS=1 python bench/bench_vision_kto.py --shape tiny-qwen2.5-vl --device cpu --steps 4 --warmup 1 \
        --completion-len 16 --out /tmp/vk.jsonl                  # functional check on a CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_grpo_step import (StepClock, checked_steps, child_rows, run_child, run_fields, save_rows,  # noqa: E402
                             train_ours)
from bench_vision import HF_TARGETS, SHAPES  # noqa: E402
from bench_vision_grpo import (build_tokenizer, make_rows, ours_model_and_processor,  # noqa: E402
                               trl_model_and_processor)


def kto_rows(a) -> list[dict]:
    """`batch` distinct rows, cycled over the steps (row i's completion: completion_len words)."""
    import random

    rng = random.Random(2)
    vocab = SHAPES[a.shape]["text_ids"]
    rows = make_rows(a.shape, a.batch, a.prompt_len)
    for i, row in enumerate(rows):
        words = " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(a.completion_len))
        row.update(images=[row.pop("image")], completion=[{"role": "assistant", "content": words}],
                   label=i % 2 == 0)
    return rows * a.steps


def common(a, cuda: bool) -> dict:
    return dict(per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, beta=0.1, loss_type="kto",
                learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                max_steps=a.steps, logging_steps=1, optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda,
                seed=3407)


def run_trl(a, clock: StepClock, rows: list[dict], tok, out_dir: str):
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    model, processor = trl_model_and_processor(a, tok)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    args = trl.KTOConfig(output_dir=out_dir, **common(a, a.device == "cuda"), max_length=None,
                         gradient_checkpointing=True, save_strategy="no", report_to=[], dataloader_num_workers=0,
                         train_sampling_strategy="sequential", use_cpu=a.device == "cpu")
    peft_config = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, target_modules=HF_TARGETS, bias="none",
                             task_type="CAUSAL_LM")
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=processor, peft_config=peft_config, callbacks=[Clock()])
    clock.start()
    trainer.train()
    return trainer.state.log_history, {}


def run_ours(a, clock: StepClock, rows: list[dict], tok, out_dir: str):
    from fasttune import KTOConfig, KTOTrainer

    model, processor = ours_model_and_processor(a, tok)

    class Timed(KTOTrainer):
        def _after_step(self, run):
            clock.step_end()
            super()._after_step(run)

    trainer = Timed(model=model, args=KTOConfig(output_dir=out_dir, shuffle=False, **common(a, a.device == "cuda")),
                    train_dataset=rows, processing_class=processor)
    history, extra = train_ours(trainer, clock)
    tokens = sum(len(ex["prompt_ids"]) + len(ex["completion_ids"]) for ex in trainer.train_examples[:a.batch])
    return history, {**extra, "row_tokens": tokens}


def child(a) -> dict:
    import torch

    tok = build_tokenizer(a.shape)
    clock = StepClock(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        history, extra = (run_trl if a.impl == "trl" else run_ours)(a, clock, kto_rows(a), tok, str(Path(tmp) / "r"))
    logs, steps, losses, grad_norms = checked_steps(history, clock, a.steps)
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    timed = steps[a.warmup:]
    peak = None
    if a.device == "cuda":
        peak = round(max(torch.cuda.max_memory_allocated() / 2**30, extra.pop("logged_peak_gib", 0)), 3)
    return {"bench": "vision_kto", "impl": a.impl, "shape": a.shape, "rows_per_step": a.batch,
            "prompt_words": a.prompt_len, "completion_words": a.completion_len,
            "image_pixels": f"{SHAPES[a.shape]['image']}x{SHAPES[a.shape]['image']}", "steps": a.steps,
            "warmup_steps": a.warmup, "step_seconds": round(statistics.median(timed), 4),
            "each_step_seconds": [round(x, 4) for x in steps], "losses": losses, "grad_norms": grad_norms,
            "kl": [h.get("kl") for h in logs], "peak_gib": peak, "lora_r": a.r, "gradient_checkpointing": "on",
            **run_fields(a.device), **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "trl"], help="child mode: run one trainer, write its row to --row-out")
    ap.add_argument("--impls", default="ours,trl")
    ap.add_argument("--shape", choices=["qwen2.5-vl-7b", "tiny-qwen2.5-vl"], default="qwen2.5-vl-7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--prompt-len", type=int, default=256, help="random words after each prompt's image")
    ap.add_argument("--completion-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--row-out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_kto.jsonl"))
    a = ap.parse_args()
    if run_child(a, child):
        return
    rows = child_rows(__file__, a, ("shape", "device", "steps", "warmup", "batch", "prompt_len", "completion_len",
                                    "r"))
    tokens = next((r["row_tokens"] for r in rows if "row_tokens" in r), None)
    for r in rows:
        r["tokens_per_second"] = round(tokens / r["step_seconds"], 1) if tokens else None
    save_rows(rows, a.out)
    if rows:
        r0 = rows[0]
        print(f"\nKTO step with images, {r0['shape']}: {r0['rows_per_step']} rows ({r0['image_pixels']} image + "
              f"{r0['prompt_words']} words, {r0['completion_words']}-word completion; {tokens} tokens), LoRA "
              f"r{r0['lora_r']}, recompute on; median of {r0['steps'] - r0['warmup_steps']} steps; {r0['card']}")
        print(f"{'impl':<6} {'step s':>8} {'tokens/s':>9} {'peak GiB':>9} {'vs trl':>7}  losses")
        for r in rows:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            vs = f"{r['speedup_vs_trl']:.2f}x" if r["speedup_vs_trl"] is not None else "-"
            print(f"{r['impl']:<6} {r['step_seconds']:>8.3f} {r['tokens_per_second'] or 0:>9,.0f} {peak:>9} "
                  f"{vs:>7}  {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    if len(rows) != len(a.impls.split(",")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
