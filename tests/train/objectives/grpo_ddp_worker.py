"""Run under torchrun (2 processes, gloo) by test_grpo_distributed.py: GRPO, then RLOO, whose groups span the two
ranks, then on-policy distillation (distillation_rank<r>.json: the log; the test runs one process alike), then
A2PO's stage 1 (a2po_rank<r>.json). Each rank writes what it saw to <out>/<method>_rank<r>.json: the advantages of
fixed completions scored across ranks (and, on rank 0, the same completions scored in one process), the sizes of its
sampling calls, its log and eval metrics."""
import json
import sys

import torch

from fasttune import FastLanguageModel, GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

ROWS = [{"prompt": f"question {i} a b"} for i in range(4)]
# one group of 4 completions per prompt, lengths 1..4 and 5..8
COMPLETIONS = [[5 + i] * (1 + i) for i in range(8)]


def length(completions, **_):
    return [float(len(c)) for c in completions]


def counting(cls):
    class Counting(cls):
        sampled = []

        def sample(self, examples, seed):
            Counting.sampled.append(len(examples))
            return super().sample(examples, seed)

    return Counting


def run(model_dir, out, method):
    model, tok = FastLanguageModel.from_pretrained(model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    trainer_cls, config_cls = (GRPOTrainer, GRPOConfig) if method == "grpo" else (RLOOTrainer, RLOOConfig)
    # 2 completions per rank and step, groups of 4: every group spans both ranks
    args = config_cls(output_dir=f"{out}/{method}", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      num_generations=4, max_completion_length=4, max_steps=2, logging_steps=1, shuffle=False,
                      per_device_eval_batch_size=4, learning_rate=1e-2, beta=0.1, eval_strategy="no",
                      **({"top_entropy_quantile": 0.5} if method == "grpo" else {}))
    trainer = counting(trainer_cls)(model, reward_funcs=[length], args=args, train_dataset=ROWS,
                                    eval_dataset=ROWS[:3], processing_class=tok)
    rank, examples = trainer.dist.rank, trainer.train_examples[:8]
    mine = slice(4 * rank, 4 * rank + 4)  # rank 0: prompt 0's group; rank 1: prompt 1's
    split = slice(2 * rank, 2 * rank + 2)  # half of prompt 0's group each
    seen = {"rank": rank}
    for name, part in (("whole_groups", mine), ("split_group", split)):
        n = part.stop - part.start
        batch = trainer.score(examples[part], COMPLETIONS[part], [False] * n, [n], across_ranks=True)[0]
        seen[name] = batch["advantages"].tolist()
    if rank == 0:  # the same completions in one process
        seen["one_process"] = trainer.score(examples, COMPLETIONS, [False] * 8, [8])[0]["advantages"].tolist()
        seen["one_process_split"] = trainer.score(examples[:4], COMPLETIONS[:4], [False] * 4, [4])[0][
            "advantages"].tolist()
    if method == "grpo":  # top_entropy_quantile's threshold is over both ranks' tokens (1, 2, 3 and 4, 5, 6)
        from fasttune.train.objectives.grpo_loss import high_entropy_mask

        ent = torch.tensor([[1.0, 2.0, 3.0]]) + 3 * rank
        seen["entropy_mask"] = high_entropy_mask(ent, torch.ones_like(ent), 0.5, trainer._all_ranks).tolist()
    trainer.start_metrics()
    trainer.train()
    seen["train_sampled"] = list(type(trainer).sampled)
    seen["log"] = trainer.log_history
    seen["eval"] = trainer.evaluate()
    seen["sampled"] = list(type(trainer).sampled)
    with open(f"{out}/{method}_rank{rank}.json", "w") as f:
        json.dump(seen, f)


def distillation_trainer(model_dir, teacher_dir, out, batch):
    """A DistillationTrainer whose student samples [5 + i] * (1 + i) for prompt i (the same in any split), 2 steps of
    `batch` prompts a rank."""
    from fasttune import DistillationConfig, DistillationTrainer

    class Fixed(DistillationTrainer):
        def sample(self, examples, seed):
            out = [[5 + int(ex["prompt"].split()[1])] * (1 + int(ex["prompt"].split()[1])) for ex in examples]
            return out, [False] * len(out)

    model, tok = FastLanguageModel.from_pretrained(model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
    args = DistillationConfig(output_dir=out, per_device_train_batch_size=batch, max_completion_length=4, max_steps=2,
                              logging_steps=1, shuffle=False, learning_rate=5e-2, beta=0.5, save_strategy="no")
    return Fixed(model, teacher_dir, args=args, train_dataset=ROWS * 2, processing_class=tok)


def a2po(model_dir, out):
    """A2PO's stage 1 on 2 ranks: each rank samples its share of the prompts (fixed completions per prompt and
    sample, so any split samples alike) and the values are gathered; rank 0 also estimates them in one process. Then
    one training step. Writes a2po_rank<r>.json."""
    from fasttune import A2POConfig, A2POTrainer

    class Fixed(A2POTrainer):
        def sample(self, examples, seed, model=None):
            seen, out = {}, []
            for ex in examples:
                i = int(ex["prompt"].split()[1])
                j = seen[i] = seen.get(i, -1) + 1
                out.append([5 + i] * (1 if i == 3 else 1 + (i + j) % 3))  # prompt 3 never scores
            return out, [False] * len(out)

    def long(completions, **_):
        return [float(len(c) > 2) for c in completions]

    model, tok = FastLanguageModel.from_pretrained(model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    args = A2POConfig(output_dir=f"{out}/a2po", per_device_train_batch_size=1, num_value_samples=3,
                      max_completion_length=4, max_steps=1, logging_steps=1, shuffle=False, save_strategy="no")
    trainer = Fixed(model, reward_funcs=[long], args=args, train_dataset=ROWS, processing_class=tok)
    trainer.estimate_optimal_values()
    seen = {"values": {str(list(k)): v for k, v in sorted(trainer._values.items())},
            "kept": [ex["prompt"] for ex in trainer.train_examples]}
    if trainer.dist.rank == 0:
        alone = Fixed(model, reward_funcs=[long], args=args, train_dataset=ROWS, processing_class=tok)
        alone._estimate(alone.train_examples, across_ranks=False)
        seen["one_process"] = {str(list(k)): v for k, v in sorted(alone._values.items())}
    trainer.train()
    seen["log"] = trainer.log_history
    with open(f"{out}/a2po_rank{trainer.dist.rank}.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    for name in ("grpo", "rloo"):  # one launch for all: process start and imports are most of its time
        run(*sys.argv[1:3], name)
    model_dir, out, teacher_dir = sys.argv[1:4]
    trainer = distillation_trainer(model_dir, teacher_dir, f"{out}/distillation", 2)
    trainer.train()
    with open(f"{out}/distillation_rank{trainer.dist.rank}.json", "w") as f:
        json.dump(trainer.log_history, f)
    a2po(model_dir, out)
