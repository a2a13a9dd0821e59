"""The peer's (Unsloth's) preference and RL notebooks (ORPO, DPO, GRPO) with only the import changed, on the real
SmolLM2-135M-Instruct, offline on CPU: TRL's own trainers around our model, a couple of steps each.

TRL 1.x names differ from the ones those notebooks were written against (the peer patches TRL; we never do):
`processing_class=` for `tokenizer=`, `beta`/`max_length` in the config instead of the trainer, ORPO under
`trl.experimental.orpo`, no `max_prompt_length` in GRPOConfig (TRL 1.16 removed it; prompts are not truncated), and
transformers 5 has no `warmup_ratio` (a fraction goes to `warmup_steps`; 0 here, since with 2 steps any warm-up makes
the first update use a learning rate of 0).
"""
import math
import re

import pytest
import torch

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(folder, r=16, **kwargs):
    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=256, dtype=None,
                                                         load_in_4bit=False, **kwargs)
    model = FastLanguageModel.get_peft_model(model, r=r, target_modules=SEVEN, lora_alpha=r, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    return model, tokenizer


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


PREFERENCES = [
    ("What is the capital of France?", "The capital of France is Paris.", "France has no capital."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have three legs."),
    ("What is 6 times 7?", "6 times 7 is 42.", "6 times 7 is 13."),
    ("Which gas do plants take in?", "Plants take in carbon dioxide.", "Plants take in helium."),
]


def test_dpo_flow_first_loss_is_ln2(smollm2_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    from fasttune import PatchDPOTrainer, is_bfloat16_supported

    monkeypatch.chdir(tmp_path)
    PatchDPOTrainer()
    model, tokenizer = _load(smollm2_dir)

    def to_chat(example):  # the DPO notebook renders the prompt with the chat template, answers end with EOS
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        return {"prompt": prompt, "chosen": example["chosen"] + tokenizer.eos_token,
                "rejected": example["rejected"] + tokenizer.eos_token}

    dataset = Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), p)) for p in PREFERENCES]).map(to_chat)
    before = _lora_b(model)
    dpo_trainer = trl.DPOTrainer(
        model=model, ref_model=None, processing_class=tokenizer, train_dataset=dataset,
        args=trl.DPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_steps=0,
                           max_steps=2, learning_rate=5e-4, fp16=not is_bfloat16_supported(),
                           bf16=is_bfloat16_supported(), logging_steps=1, optim="adamw_8bit", weight_decay=0.0,
                           lr_scheduler_type="linear", seed=42, output_dir="outputs", report_to="none", beta=0.1,
                           max_length=256))
    dpo_trainer.train()
    losses = _losses(dpo_trainer)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # Step 0: LoRA B is zero, so the policy is the reference and every log-ratio is 0: loss = -log sigmoid(0).
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[1] < losses[0]
    margins = [h["rewards/margins"] for h in dpo_trainer.state.log_history if "rewards/margins" in h]
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[1] > 0
    assert any(not torch.equal(before[n], p) for n, p in _lora_b(model).items())


ORPO_PROMPT = "### Question:\n{}\n\n### Answer:\n"


def test_orpo_flow(smollm2_dir, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from fasttune import is_bfloat16_supported

    monkeypatch.chdir(tmp_path)
    model, tokenizer = _load(smollm2_dir)
    EOS_TOKEN = tokenizer.eos_token

    def format_prompt(example):
        return {"prompt": ORPO_PROMPT.format(example["prompt"]), "chosen": example["chosen"] + EOS_TOKEN,
                "rejected": example["rejected"] + EOS_TOKEN}

    dataset = Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), p)) for p in PREFERENCES])
    dataset = dataset.map(format_prompt)
    before = _lora_b(model)
    orpo_trainer = ORPOTrainer(
        model=model, train_dataset=dataset, processing_class=tokenizer,
        args=ORPOConfig(max_length=256, max_completion_length=64, per_device_train_batch_size=4,
                        gradient_accumulation_steps=1, beta=0.1, logging_steps=1, optim="adamw_8bit",
                        lr_scheduler_type="linear", max_steps=2, learning_rate=5e-4, fp16=not is_bfloat16_supported(),
                        bf16=is_bfloat16_supported(), output_dir="outputs", report_to="none"))
    orpo_trainer.train()
    losses = _losses(orpo_trainer)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # ORPO's loss is the chosen answers' NLL minus beta * log sigmoid(log odds ratio): above the NLL alone.
    nll = [h["nll_loss"] for h in orpo_trainer.state.log_history if "nll_loss" in h]
    assert nll and all(loss > n for loss, n in zip(losses, nll))
    assert losses[1] < losses[0]
    assert any(not torch.equal(before[n], p) for n, p in _lora_b(model).items())


# --- GRPO (the peer's GRPO notebooks: a math prompt, format and correctness rewards) ----------------------------

SYSTEM_PROMPT = "Answer with a number between <answer> and </answer>."
QUESTIONS = [("What is 2 + 2?", "4"), ("What is 3 + 5?", "8"), ("What is 10 - 7?", "3"), ("What is 2 * 6?", "12")]
ANSWER = re.compile(r"<answer>\s*(\d+)\s*</answer>")


def length_reward(prompts, completions, **kwargs):
    """Closer to 20 characters is better: different completions get different rewards, so advantages are not 0."""
    return [-abs(len(c[0]["content"]) - 20) / 20 for c in completions]


def correctness_reward(prompts, completions, answer, **kwargs):
    found = [ANSWER.search(c[0]["content"]) for c in completions]
    return [2.0 if m is not None and m.group(1) == a else 0.0 for m, a in zip(found, answer)]


@pytest.mark.parametrize("fp8", [False, True], ids=["16bit", "fp8"])  # fp8: the peer's FP8 GRPO notebooks
def test_grpo_flow(fp8, smollm2_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    from fasttune import is_bfloat16_supported

    monkeypatch.chdir(tmp_path)
    # The GRPO notebooks ask for vLLM here; the keywords are accepted and generation runs on our own generate.
    model, tokenizer = _load(smollm2_dir, r=8, fast_inference=True, max_lora_rank=8, gpu_memory_utilization=0.6,
                             load_in_fp8=fp8)
    if fp8:
        assert model.model.layers[0].mlp.up_proj.base_layer.quant_type == "fp8"
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": q}], "answer": a} for q, a in QUESTIONS])
    before = _lora_b(model)
    trainer = trl.GRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=[length_reward, correctness_reward],
        train_dataset=dataset,
        args=trl.GRPOConfig(learning_rate=5e-4, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1, warmup_steps=0,
                            lr_scheduler_type="cosine", optim="adamw_8bit", logging_steps=1,
                            per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=2,
                            max_completion_length=8, max_steps=2, max_grad_norm=0.1, report_to="none",
                            fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(),
                            output_dir="outputs", seed=3407))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["loss"])
        assert "rewards/length_reward/mean" in h and "rewards/correctness_reward/mean" in h
        assert -20.0 <= h["rewards/length_reward/mean"] <= 0.0
        assert h["rewards/correctness_reward/mean"] in (0.0, 1.0, 2.0)  # mean over the 2 completions of 1 prompt
        assert 0 < h["completions/mean_length"] <= 8
        assert h["reward"] == pytest.approx(h["rewards/length_reward/mean"] + h["rewards/correctness_reward/mean"],
                                            abs=1e-5)
    assert any(not torch.equal(before[n], p) for n, p in _lora_b(model).items())
