"""GRPO steps on prompts with images: fasttune's GRPOTrainer against TRL 1.16's GRPOTrainer (transformers generation),
same GPU, same run.

A Qwen2.5-VL-7B shape (bench_vision.py's SHAPES, random-init weights drawn in a fixed order from seed 0: both trainers
start from the same base), bf16, LoRA r16 on the language model's 7 projections (PEFT's LoraConfig through TRL's
peft_config; FastModel.get_peft_model with finetune_vision_layers=False for ours), vision tower frozen, gradient
checkpointing on for both. The tokenizer is built here (bench_grpo_step.py's word-level vocabulary "w<id>", with the
checkpoint's vision and stop tokens at their ids), with a chat template that writes an image item as
<|vision_start|><|image_pad|><|vision_end|>; the image processor is transformers' Qwen2-VL one (448 x 448 pixels ->
256 image tokens), in TRL's Qwen2_5_VLProcessor for TRL and fasttune's VisionProcessor for ours. Each row: one image
of random pixels and `prompt_len` random words; the reward is bench_grpo_step's even_ids (the share of a completion's
words with an even id). Random weights practically never sample the stop token, so completions run to
max_completion_length: the intended, comparable workload.

Both trainers get bench_grpo_step's settings (common_fields): per step 8 prompts x 8 generations sampled in one
generate() call, 256 completion tokens, beta 0, dapo, constant lr 1e-5, fused AdamW, bf16. Each trainer in its own
process; per step the synchronized wall time (the first step is a warm-up), the time inside generate(), loss and
grad-norm. Asserts finite losses and grad-norm > 0 at every step; appends one JSONL row per trainer to
bench/results/vision_grpo.jsonl and prints the table.

    python bench/bench_vision_grpo.py                            # GPU: qwen2.5-vl-7b, 4 steps, ours and trl
    OMP_NUM_THREADS=1 python bench/bench_vision_grpo.py --shape tiny-qwen2.5-vl --device cpu --steps 2 \
        --completion-len 8 --prompts 2 --num-generations 2 --out /tmp/vg.jsonl   # functional check on a CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_grpo_step import (StepClock, checked_steps, child_rows, clock_generate, common_fields,  # noqa: E402
                             even_ids, run_child, run_fields, save_rows, train_ours)
from bench_vision import SHAPES, build_transformers  # noqa: E402

TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }} {% else %}"
            "{% for item in m['content'] %}{% if item['type'] == 'image' %}"
            "{{ '<|vision_start|><|image_pad|><|vision_end|> ' }}{% else %}{{ item['text'] }} {% endif %}"
            "{% endfor %}{% endif %}{% endfor %}")
FIRST_WORD = 3


def even_words(completions, **kwargs) -> list[float]:
    """bench_grpo_step's even_ids on chat completions (the prompts are messages): the assistant's text."""
    return even_ids([c[0]["content"] if isinstance(c, list) else c for c in completions])


def build_tokenizer(shape: str):
    """Word-level: "w<id>" for every id from 3 up, except the shape's vision tokens, stop (<|im_end|>) and pad
    (<|endoftext|>) tokens at their own ids (special tokens, split out before the whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    s = SHAPES[shape]
    ids, text = s["ids"], s["text"]
    special = {"<|vision_start|>": ids["vision_start_token_id"], "<|vision_end|>": ids["vision_end_token_id"],
               "<|image_pad|>": ids["image_token_id"], "<|video_pad|>": ids["video_token_id"],
               "<|im_end|>": text["eos_token_id"]}
    if text["pad_token_id"] != text["eos_token_id"]:
        special["<|endoftext|>"] = text["pad_token_id"]
    taken = set(special.values())
    words = {"<unk>": 0, **{f"w{i}": i for i in range(FIRST_WORD, text["vocab_size"]) if i not in taken}, **special}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad = "<|endoftext|>" if "<|endoftext|>" in special else "<|im_end|>"
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token=pad,
                                  padding_side="left", additional_special_tokens=list(special))
    out.chat_template = TEMPLATE
    return out


def image_processor(shape: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = SHAPES[shape]["image"]
    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=side * side,
                                    max_pixels=side * side)


def trl_model_and_processor(a, tok):
    """transformers' model of a.shape (bench_vision's seeded draw) on a.device and TRL's processor of `tok`."""
    import torch
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    torch.manual_seed(0)
    model = build_transformers(a.shape, a.device)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model, Qwen2_5_VLProcessor(image_processor=image_processor(a.shape), tokenizer=tok,
                                      video_processor=Qwen2VLVideoProcessor(), chat_template=TEMPLATE)


def ours_model_and_processor(a, tok):
    """fasttune's model of the same weights with LoRA r=a.r on the language model (recompute on), and its
    VisionProcessor of `tok`."""
    import torch

    from fasttune import FastModel
    from fasttune.data.vision import VisionProcessor
    from fasttune.models.loading import vision_model_from_hf

    torch.manual_seed(0)
    hf = build_transformers(a.shape, a.device)
    model = vision_model_from_hf(hf, hf.dtype, torch.device(a.device), f"random {a.shape}")
    del hf
    if a.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.lora_settings = None
    model = FastModel.get_peft_model(model, r=a.r, lora_alpha=a.r, finetune_vision_layers=False,
                                     use_gradient_checkpointing=True)
    return model, VisionProcessor(tok, image_processor(a.shape), TEMPLATE, "<|image_pad|>", 2)


def make_rows(shape: str, n: int, length: int) -> list[dict]:
    import random

    import numpy as np
    from PIL import Image

    rng, side = random.Random(1), SHAPES[shape]["image"]
    pixels = np.random.default_rng(1)
    vocab = SHAPES[shape]["text_ids"]
    return [{"image": Image.fromarray(pixels.integers(0, 256, (side, side, 3), dtype=np.uint8)),
             "prompt": [{"role": "user", "content": " ".join(f"w{rng.randrange(FIRST_WORD, vocab)}"
                                                              for _ in range(length))}]} for _ in range(n)]


def run_trl(a, clock: StepClock, rows: list[dict], tok, out_dir: str):
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from bench_vision import HF_TARGETS

    model, processor = trl_model_and_processor(a, tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    args = trl.GRPOConfig(output_dir=out_dir, **common_fields(a, a.device == "cuda"), use_vllm=False,
                          gradient_checkpointing=True, save_strategy="no", report_to=[], dataloader_num_workers=0,
                          use_cpu=a.device == "cpu")
    peft_config = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, target_modules=HF_TARGETS, bias="none",
                             task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=even_words, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=processor, peft_config=peft_config, callbacks=[Clock()])
    clock_generate(trainer.model, a.device, clock.gen)
    clock.start()
    trainer.train()
    return trainer.state.log_history, {}


def run_ours(a, clock: StepClock, rows: list[dict], tok, out_dir: str):
    from fasttune import GRPOConfig, GRPOTrainer

    model, processor = ours_model_and_processor(a, tok)
    clock_generate(model, a.device, clock.gen)

    class Timed(GRPOTrainer):
        def _after_step(self, run):
            clock.step_end()
            super()._after_step(run)

    trainer = Timed(model, reward_funcs=[even_words], args=GRPOConfig(output_dir=out_dir,
                                                                    **common_fields(a, a.device == "cuda")),
                    train_dataset=rows, processing_class=processor)
    return train_ours(trainer, clock)


def child(a) -> dict:
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device; run with --device cpu (and --shape tiny-qwen2.5-vl) for a functional check.")
    tok = build_tokenizer(a.shape)
    rows = make_rows(a.shape, a.prompts * a.steps, a.prompt_len)
    clock = StepClock(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        history, extra = (run_trl if a.impl == "trl" else run_ours)(a, clock, rows, tok, str(Path(tmp) / "run"))
    logs, steps, losses, grad_norms = checked_steps(history, clock, a.steps)
    timed = steps[a.warmup:] or steps
    gen_s = clock.gen_seconds[a.warmup:] or clock.gen_seconds
    gen_n = clock.gen_positions[a.warmup:] or clock.gen_positions
    peak = None
    if a.device == "cuda":
        peak = round(max(torch.cuda.max_memory_allocated() / 2**30, extra.pop("logged_peak_gib", 0)), 3)
    s = SHAPES[a.shape]
    return {"bench": "vision_grpo", "impl": a.impl, "shape": a.shape, "prompts_per_step": a.prompts,
            "num_generations": a.num_generations, "max_completion_length": a.completion_len,
            "prompt_words": a.prompt_len, "image_pixels": f"{s['image']}x{s['image']}",
            "image_tokens": (s["image"] // 28) ** 2, "steps": a.steps, "warmup_steps": a.warmup,
            "step_seconds": round(statistics.median(timed), 4), "each_step_seconds": [round(x, 4) for x in steps],
            "generate_seconds": round(statistics.median(gen_s), 4) if any(gen_s) else None,
            "each_generate_seconds": [round(x, 4) for x in clock.gen_seconds],
            "generated_tokens_per_second": round(sum(gen_n) / sum(gen_s), 1) if any(gen_s) else None,
            "losses": losses, "grad_norms": grad_norms, "rewards": [h.get("reward") for h in logs],
            "completion_mean_length": [h.get("completions/mean_length") for h in logs], "peak_gib": peak,
            "lora_r": a.r, "gradient_checkpointing": "on", "learning_rate": a.lr, "beta": 0.0, "loss_type": "dapo",
            **run_fields(a.device), **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "trl"], help="child mode: run one trainer, write its row to --row-out")
    ap.add_argument("--impls", default="ours,trl")
    ap.add_argument("--shape", choices=["qwen2.5-vl-7b", "tiny-qwen2.5-vl"], default="qwen2.5-vl-7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps, the first --warmup of them not timed")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32, help="random words after each prompt's image")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--row-out", help="child mode: where to write the row (JSON)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_grpo.jsonl"))
    a = ap.parse_args()
    if run_child(a, child):
        return
    rows = child_rows(__file__, a, ("shape", "device", "steps", "warmup", "prompts", "num_generations",
                                    "completion_len", "prompt_len", "r", "lr"))
    save_rows(rows, a.out)
    if rows:
        r0 = rows[0]
        print(f"\nGRPO step with images, {r0['shape']}: {r0['prompts_per_step']} prompts (one {r0['image_pixels']} "
              f"image + {r0['prompt_words']} words) x {r0['num_generations']} generations x "
              f"{r0['max_completion_length']} tokens, LoRA r{r0['lora_r']}, recompute on; median of "
              f"{r0['steps'] - r0['warmup_steps']} steps after {r0['warmup_steps']} warm-up; {r0['card']}")
        print(f"{'impl':<6} {'step s':>8} {'generate s':>11} {'gen tok/s':>10} {'peak GiB':>9} {'vs trl':>7}  "
              f"grad norms")
        for r in rows:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            vs = f"{r['speedup_vs_trl']:.2f}x" if r["speedup_vs_trl"] is not None else "-"
            print(f"{r['impl']:<6} {r['step_seconds']:>8.3f} {r['generate_seconds'] or 0:>11.3f} "
                  f"{r['generated_tokens_per_second'] or 0:>10,.0f} {peak:>9} {vs:>7}  "
                  f"{', '.join(f'{g:.3g}' for g in r['grad_norms'])}")
    if len(rows) != len(a.impls.split(",")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
