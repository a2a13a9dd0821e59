"""Run by tests/train/test_fsdp.py, alone or under torchrun: a few SFT steps on a tiny model, FSDP or (under
torchrun without fsdp) DDP.

argv: model_dir runs-json, a list of [out_dir, options] run one after another in this process (starting Python,
torch and the process group once for all of them); options: grad_accum, fsdp, checkpointing, modules_to_save,
max_steps, resume, dtype, load_in_4bit, load_in_8bit, load_in_fp8, packing, method ("sft" | "dpo" | "reward" | "kto" |
"grpo" | "rloo" | "gmpo" | "online_dpo" | "a2po" | "distillation" | "gkd" |
"iw_opd" | "sdft" | "sdpo" (SAMPLING); evaluate: also evaluate() the sampling ones),
rows (KTO's unpaired rows), kernels
(FASTTUNE_KERNELS for that run),
batch (per_device_train_batch_size, default 2), model (another tiny family's folder beside model_dir),
router_aux_loss_coef (SFT), staged (from_pretrained(fsdp=True): the model waits in host memory until sharded),
rank_seed (_rank_seed), prompts (how many rows a sampling trainer gets, default 8), config (a sampling trainer's
config fields over its own settings),
vision (a tiny vision-language model's folder beside model_dir, its tower trained with LoRA too; "sft", "dpo", "kto"
and "grpo" (beta: its KL weight, default 0.1) on rows with images, some without: vision_rows).
Prints {out_dir: per-step losses} (JSON) on rank 0.
"""
import faulthandler
import json
import os
import sys

import torch

from fasttune import (A2POConfig, A2POTrainer, DistillationConfig, DistillationTrainer, DPOConfig, DPOTrainer,
                      FastLanguageModel, FastVisionModel, GKDConfig, GKDTrainer, GMPOConfig, GMPOTrainer, GRPOConfig,
                      GRPOTrainer, IWOPDConfig, IWOPDTrainer, KTOConfig, KTOTrainer, OnlineDPOConfig,
                      OnlineDPOTrainer, RewardConfig, RewardTrainer, RLOOConfig, RLOOTrainer, SDFTConfig, SDFTTrainer,
                      SDPOConfig, SDPOTrainer, SFTConfig, SFTTrainer)


# The trainers on GRPO's sampling loop: (config, trainer, their own settings, their rows, reward / teacher given).
GROUPS = {"num_generations": 2, "beta": 0.1}  # groups of 2 sampled completions, a KL term
ON_POLICY = {"lmbda": 1.0, "max_new_tokens": 6}  # GKD's loop: the student samples every completion
TEACHER = "teacher"  # (the "qwen3_moe" folder beside model_dir: a teacher of another family, the same tokenizer)
SAMPLING = {"grpo": (GRPOConfig, GRPOTrainer, GROUPS, "prompts", "reward"),
            "rloo": (RLOOConfig, RLOOTrainer, GROUPS, "prompts", "reward"),
            "gmpo": (GMPOConfig, GMPOTrainer, GROUPS, "prompts", "reward"),
            "online_dpo": (OnlineDPOConfig, OnlineDPOTrainer, GROUPS, "prompts", "reward"),
            # one completion a prompt, and 2 reference samples a prompt for stage 1's values
            "a2po": (A2POConfig, A2POTrainer, {"num_generations": 1, "num_value_samples": 2}, "prompts", "reward"),
            "distillation": (DistillationConfig, DistillationTrainer, {}, "prompts", TEACHER),
            "gkd": (GKDConfig, GKDTrainer, ON_POLICY, "conversations", TEACHER),
            "iw_opd": (IWOPDConfig, IWOPDTrainer, ON_POLICY, "conversations", TEACHER),
            # the EMA teacher: its weights swapped into the (sharded) student for the teacher's passes
            "sdft": (SDFTConfig, SDFTTrainer, {"num_generations": 2, "teacher_model_kind": "ema",
                                               "teacher_update_rate": 0.5}, "privileged", None),
            "sdpo": (SDPOConfig, SDPOTrainer, {"num_generations": 2}, "privileged", "reward")}


def sampling_rows(kind: str, n: int = 8) -> list[dict]:
    """n rows of a sampling trainer's kind: prompts, conversations (GKD's), or prompts with privileged context."""
    if kind == "conversations":
        return [{"messages": [{"role": "user", "content": f"question {i} a b"},
                              {"role": "assistant", "content": "abc " * (1 + i % 3)}]} for i in range(n)]
    extra = (lambda i: {"privileged_context": f"Answer: {i} b"}) if kind == "privileged" else (lambda i: {})
    return [{"prompt": f"question {i} a b", **extra(i)} for i in range(n)]


def _distinct(completions, **_):
    """GRPO's reward in the "grpo" runs: the completion's number of distinct characters (completions of one length
    still differ, so the advantages are not all 0); a conversational completion's (a vision prompt's) content."""
    return [float(len(set(c if isinstance(c, str) else c[0]["content"]))) for c in completions]


def vision_rows(method: str) -> list[dict]:
    """Rows with one image (of two sizes) or none: rows 2-3 of every 4 have none, so with 2 rows a micro-batch
    and a rank one rank's micro-batch holds no image. "grpo": 3 prompts, so the second step of 2 ranks x 1 prompt
    is short (one rank samples nothing and runs the loop's filler pass)."""
    from tiny_vision import solid_image

    names = ["blue", "green", "red"]
    colours = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 210)}

    def images(i):
        return [solid_image(colours[names[i % 3]], (28 * (1 + i % 2), 56))] if i % 4 < 2 else []

    def user(i, text):
        return [{"role": "user", "content": [{"type": "image"}] * len(images(i)) + [{"type": "text", "text": text}]}]

    if method == "sft":
        return [{"images": images(i), "messages": [*user(i, f"what is {i}?"),
                                                   {"role": "assistant", "content": "noise " * (1 + i % 3)}]}
                for i in range(8)]
    if method == "dpo":
        return [{"images": images(i), "prompt": user(i, "Colour?"),
                 "chosen": [{"role": "assistant", "content": names[i % 3]}],
                 "rejected": [{"role": "assistant", "content": f"{names[(i + 1) % 3]}, I think"}]} for i in range(8)]
    if method == "kto":
        return [{"images": images(i), "prompt": user(i, "Colour?"), "label": i % 3 != 1,
                 "completion": [{"role": "assistant", "content": names[i % 3]}]} for i in range(8)]
    return [{"images": images(i), "prompt": user(i, f"Colour {i}?")} for i in (0, 2, 1)]


def run(model_dir, out_dir, o):
    os.environ["FASTTUNE_KERNELS"] = o.get("kernels", "")
    reward = o.get("method") == "reward"  # a one-output sequence classifier (its score head seeded alike)
    head = {"auto_model": "AutoModelForSequenceClassification", "num_labels": 1} if reward else {}
    torch.manual_seed(0)
    if o.get("model") or o.get("vision"):
        model_dir = os.path.join(os.path.dirname(model_dir), o.get("model") or o["vision"])
    if o.get("vision"):
        return run_vision(model_dir, out_dir, o)
    model, tok = FastLanguageModel.from_pretrained(model_dir, dtype=o.get("dtype"),
                                                   load_in_4bit=o.get("load_in_4bit", False),
                                                   load_in_8bit=o.get("load_in_8bit", False),
                                                   load_in_fp8=o.get("load_in_fp8", False),
                                                   fsdp=o.get("staged", False), **head)
    if o.get("staged"):  # where this rank's loaded tensors are: on the meta device after rank 0
        os.makedirs(out_dir, exist_ok=True)
        tensors = [*model.parameters(), *model.buffers()]
        with open(f"{out_dir}/load_rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump({"meta": sum(t.is_meta for t in tensors), "tensors": len(tensors)}, f)
    seeded = _rank_seed(o)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=o.get("modules_to_save"),
                                             use_gradient_checkpointing=o.get("checkpointing", False),
                                             use_dora=o.get("use_dora", False), **seeded)
    dpo = o.get("method") in ("dpo", "reward", "kto")
    if o.get("method") == "kto":
        from preference_oracle import unpaired_rows

        rows, config, trainer_cls = unpaired_rows(o.get("rows", 24)), KTOConfig, KTOTrainer
    elif dpo:
        from preference_oracle import pair_rows

        rows, config, trainer_cls = pair_rows(24), *((RewardConfig, RewardTrainer) if reward else
                                                     (DPOConfig, DPOTrainer))
    else:
        rows = [{"text": f"row {i} " + "abc " * (1 + i % 5)} for i in range(24)]
        config, trainer_cls = SFTConfig, SFTTrainer
    if o.get("method") in SAMPLING:  # groups of 2 sampled completions (each rank's stop at their own lengths)
        config, trainer_cls, own, kind, given = SAMPLING[o["method"]]
        fields = dict(output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=o["grad_accum"],
                      max_completion_length=6, learning_rate=1e-2, max_steps=o.get("max_steps", 3), logging_steps=1,
                      shuffle=False, fsdp=o.get("fsdp", False), eval_strategy="no", per_device_eval_batch_size=2,
                      **own)
        args = config(**{**fields, **o.get("config", {})})
        given = {"reward_funcs": [_distinct]} if given == "reward" else {} if given is None else \
            {"teacher_model": os.path.join(os.path.dirname(model_dir), "qwen3_moe")}
        prompts = sampling_rows(kind, o.get("prompts", 8))
        trainer = trainer_cls(model, args=args, processing_class=tok, train_dataset=prompts, **given,
                              **({"eval_dataset": [{"prompt": f"check {i} c"} for i in range(3)]}  # (3 batches:
                                 if o.get("evaluate") else {}))  # 2 + 1)
    else:
        args = config(output_dir=out_dir, per_device_train_batch_size=o.get("batch", 2),
                      gradient_accumulation_steps=o["grad_accum"],
                      learning_rate=1e-2, max_steps=o.get("max_steps", 5), save_steps=3, logging_steps=1,
                      fsdp=o.get("fsdp", False), packing=o.get("packing", False),
                      **({} if dpo else {"max_seq_length": 48}),
                      **({"router_aux_loss_coef": o["router_aux_loss_coef"]} if "router_aux_loss_coef" in o else {}))
        trainer = trainer_cls(model=model, tokenizer=tok, train_dataset=rows, args=args)
    trainer.train(resume_from_checkpoint=o.get("resume"))
    if o.get("fsdp") or trainer.dist.is_main:  # FSDP: a collective, rank 0 writes; DDP: rank 0 alone saves (two
        model.save_pretrained(f"{out_dir}/adapter")  # ranks writing the same folder would race)
    if o.get("fsdp") and (o.get("load_in_4bit") or o.get("load_in_8bit") or o.get("load_in_fp8")):
        from torch.distributed.tensor import DTensor  # this rank's share of the quantised storage

        from fasttune.quant.experts import QuantExpertWeight
        from fasttune.quant.linear import QuantLinear

        held = {"local": 0, "whole": 0}
        for m in model.modules():
            if isinstance(m, (QuantLinear, QuantExpertWeight)):
                for name in ("packed", "absmax") if m.quant_type == "nf4" else ("qweight",):
                    t = m._parameters.get(name, m._buffers.get(name))  # (as held, not as read)
                    held["local"] += (t.to_local() if isinstance(t, DTensor) else t).numel()
                    held["whole"] += t.numel()
        with open(f"{out_dir}/quant_shards_rank{trainer.dist.rank}.json", "w") as f:
            json.dump(held, f)
    if o.get("fsdp") and isinstance(getattr(trainer, "teacher", None), torch.nn.Module):  # (SDFT's: the EMA swap)
        from torch.distributed.tensor import DTensor  # this rank's share of the teacher

        from fasttune.sharding import is_sharded

        params = list(trainer.teacher.parameters())  # (its root is freed again after each optimizer step)
        with open(f"{out_dir}/teacher_rank{trainer.dist.rank}.json", "w") as f:
            json.dump({"sharded": is_sharded(trainer.teacher), "whole": sum(p.numel() for p in params),
                       "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)}, f)
    losses = [h["loss"] for h in trainer.log_history if "loss" in h]
    if o.get("method") in SAMPLING:  # what was sampled and scored, step by step, and an evaluation split 2 + 1
        evaluated = trainer.evaluate() if o.get("evaluate") else None
        if trainer.dist.is_main:
            with open(f"{out_dir}/grpo_log.json", "w") as f:
                json.dump({"log": trainer.log_history, "eval": evaluated}, f)
    return trainer.dist.is_main, losses


def _rank_seed(o) -> dict:
    """Option rank_seed: seed each rank differently (1000 + its rank) before the LoRA weights are drawn, as
    accelerate's set_seed(device_specific=True) does, and draw them from that seed (random_state=None; the default
    3407 would draw the same on every rank): the trainer must start every rank from rank 0's adapter. Returns
    get_peft_model's keywords."""
    if not o.get("rank_seed"):
        return {}
    torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))
    return {"random_state": None}


def run_vision(model_dir, out_dir, o):
    """run() for a vision-language model (option "vision"): SFT, DPO or GRPO (method) on vision_rows."""
    torch.manual_seed(0)
    model, proc = FastVisionModel.from_pretrained(model_dir, dtype=torch.float32, fsdp=o.get("staged", False),
                                                  load_in_4bit=o.get("load_in_4bit", False))
    seeded = _rank_seed(o)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, finetune_vision_layers=True, **seeded,
                                           use_gradient_checkpointing=o.get("checkpointing", False))
    method = o.get("method", "sft")
    common = dict(output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=o["grad_accum"],
                  learning_rate=1e-2, max_steps=o.get("max_steps", 5), logging_steps=1, shuffle=False, save_steps=3,
                  fsdp=o.get("fsdp", False))
    rows = vision_rows(method)
    if method == "grpo":
        trainer = GRPOTrainer(model, reward_funcs=[_distinct], processing_class=proc, train_dataset=rows,
                              args=GRPOConfig(num_generations=2, max_completion_length=6, beta=o.get("beta", 0.1),
                                              **common))
    elif method == "dpo":
        trainer = DPOTrainer(model=model, processing_class=proc, train_dataset=rows, args=DPOConfig(**common))
    elif method == "kto":
        trainer = KTOTrainer(model=model, processing_class=proc, train_dataset=rows, args=KTOConfig(**common))
    else:
        trainer = SFTTrainer(model, proc, train_dataset=rows, args=SFTConfig(max_seq_length=1024, **common))
    trainer.train()
    model.save_pretrained(f"{out_dir}/adapter")  # (a collective under FSDP; rank 0 writes)
    if method == "grpo" and trainer.dist.is_main:
        with open(f"{out_dir}/grpo_log.json", "w") as f:
            json.dump({"log": trainer.log_history, "eval": None}, f)
    return trainer.dist.is_main, [h["loss"] for h in trainer.log_history if "loss" in h]


def main(model_dir, runs):
    losses, main_rank = {}, True
    for out_dir, options in json.loads(runs):
        main_rank, losses[out_dir] = run(model_dir, out_dir, options)
    if main_rank:
        print(json.dumps(losses))


if __name__ == "__main__":
    faulthandler.enable()  # an abort prints every thread's Python stack
    main(*sys.argv[1:])
