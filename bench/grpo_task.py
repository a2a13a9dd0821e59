"""Does GRPO raise a verifiable reward? SmolLM2-135M-Instruct (embedded, no hub) on a synthetic task generated here.

Task: "What is A plus B? Reply with only the number." (A, B in 1..20). Rewards: `exact_match` (the reply is exactly
A+B) plus `contains_sum` (0.5 when the right number appears anywhere in the reply, a foothold for a model that
answers in sentences). Completions are short (max 12 tokens) so a run takes minutes on a CPU. Train and held-out
prompts use disjoint (A, B) pairs; the held-out mean reward of greedy replies is measured before and after.
Per-step metrics go to bench/results/grpo_task.jsonl (one row per step plus a summary row) and a plot beside it:

    python bench/grpo_task.py [--steps 24 --generations 6 --lr 5e-4]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAX_NEW = 12  # "19 + 20 = 39" is 12 tokens: room for the sentence form, which earns contains_sum


def make_task(seed: int = 0, n_train: int = 200, n_eval: int = 32):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 21) for b in range(1, 21)]
    rng.shuffle(pairs)

    def row(a, b):
        return {"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Reply with only the number."}],
                "answer": str(a + b)}

    return [row(*p) for p in pairs[:n_train]], [row(*p) for p in pairs[n_train:n_train + n_eval]]


def contains_sum(prompts, completions, answer, **_):
    """0.5 when the right number appears as a whole number anywhere in the reply."""
    return [0.5 * bool(re.search(rf"(?<!\d){a}(?!\d)", c[-1]["content"])) for c, a in zip(completions, answer)]


def held_out_reward(model, tok, rows, funcs) -> dict:
    """Greedy replies to the held-out prompts, scored by the same reward functions."""
    import torch

    from fasttune.generate import generate, left_pad, stop_token_ids

    stops = stop_token_ids(tok, model)
    ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
           ["input_ids"] for r in rows]
    x, mask = left_pad(ids, tok.pad_token_id)
    out = generate(model, x, mask, max_new_tokens=MAX_NEW, eos_token_id=stops)
    texts = [tok.decode([t for t in row[x.shape[1]:].tolist() if t not in stops], skip_special_tokens=True)
             for row in out]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    answers = [r["answer"] for r in rows]
    scores = {f.__name__: f(prompts=None, completions=completions, answer=answers) for f in funcs}
    total = torch.tensor(list(scores.values())).sum(0)
    return {"reward": float(total.mean()), **{k: sum(v) / len(v) for k, v in scores.items()},
            "samples": texts[:4]}


def plot(history: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "reward" in h]
    rewards = [h["reward"] for h in history if "reward" in h]
    smooth = [sum(rewards[max(0, i - 4):i + 1]) / len(rewards[max(0, i - 4):i + 1]) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, rewards, label="mean reward (sampled)", color="tab:green", alpha=0.5)
    ax.plot(steps, smooth, label="mean reward, 5-step running mean", color="tab:green", linewidth=2)
    for key, color in (("rewards/exact_match/mean", "tab:blue"), ("rewards/contains_sum/mean", "tab:orange")):
        ax.plot(steps, [h[key] for h in history if "reward" in h], "--", label=key, color=color, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title("GRPO, SmolLM2-135M-Instruct, CPU")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--generations", type=int, default=6, help="completions per prompt; 2 prompts per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default=str(RESULTS / "grpo_task.jsonl"))
    a = ap.parse_args()
    import torch

    from fasttune import FastLanguageModel, GRPOConfig, GRPOTrainer
    from fasttune.train.rewards import ExactMatch

    torch.manual_seed(0)
    train, held_out = make_task()
    funcs = [ExactMatch(), contains_sum]
    model, tok = FastLanguageModel.from_pretrained()
    before = held_out_reward(model, tok, held_out, funcs)
    print("before:", before)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.generations,
                          gradient_accumulation_steps=2, num_generations=a.generations, max_completion_length=MAX_NEW,
                          temperature=0.8, learning_rate=a.lr, warmup_steps=2, logging_steps=1, beta=0.0)
        trainer = GRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=train, processing_class=tok)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
    after = held_out_reward(model, tok, held_out, funcs)
    print("after:", after)
    history = [h for h in trainer.log_history if "loss" in h]
    k = max(1, len(history) // 5)
    first, last = history[:k], history[-k:]
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {"bench": "grpo_task", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
               "task": "A plus B, reply with only the number", "steps": a.steps,
               "completions_per_step": 2 * a.generations, "num_generations": a.generations, "learning_rate": a.lr,
               f"train_reward_first_{k}_steps": sum(h["reward"] for h in first) / k,
               f"train_reward_last_{k}_steps": sum(h["reward"] for h in last) / k,
               "held_out_greedy_reward_before": before["reward"], "held_out_greedy_reward_after": after["reward"],
               "held_out_exact_match_before": before["exact_match"], "held_out_exact_match_after": after["exact_match"],
               "samples_after": after["samples"], "train_seconds": round(seconds, 1), "device": device,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = ("step", "loss", "reward", "reward_std", "rewards/exact_match/mean", "rewards/contains_sum/mean",
            "completions/mean_length", "frac_reward_zero_std", "grad_norm", "learning_rate")
    with open(path, "w") as f:
        for h in history:
            f.write(json.dumps({"bench": "grpo_task", **{key: h[key] for key in keep if key in h}}) + "\n")
        f.write(json.dumps(summary) + "\n")
    plot(history, path.with_suffix(".png"))
    print(json.dumps(summary))
    print(f"mean reward (sampled, training prompts): {summary[f'train_reward_first_{k}_steps']:.3f} in the first {k} "
          f"steps -> {summary[f'train_reward_last_{k}_steps']:.3f} in the last {k}; held-out greedy reward "
          f"{before['reward']:.3f} -> {after['reward']:.3f} ({device})")


if __name__ == "__main__":
    main()
