"""SDFT: TRL 1.16's experimental SDFTTrainer (on a PEFT twin carrying our adapter, its sampler replaced by fixed
completions through a subclass hook) is the oracle for one micro-batch's loss, LoRA gradients and metric, for each
distillation mode, the teacher kinds "base" and "live", chat prompts, skipped tokens and the importance weights of
reused samples; plus the EMA teacher, the accumulation mean, the config's and data's errors, a short run with
evaluation and the CLI."""
import json
import math

import pytest
import torch
from grpo_oracle import COMPLETIONS
from peft_oracle import saved_lora_adapter
from preference_oracle import restored
from self_distillation_oracle import both, one_step_both

from fasttune import FastLanguageModel, SDFTConfig, SDFTTrainer
from fasttune.errors import ConfigError, DataError
from fasttune.train.objectives.reference import adapters_disabled

trl = pytest.importorskip("trl")
G = 4  # completions per prompt
ROWS = [{"prompt": "add: 1+1", "privileged_context": "Answer: ab"}, {"prompt": "x", "privileged_context": "b b"}]
CHAT = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add: 1+1"}],
         "privileged_context": [{"role": "assistant", "content": "ab"}]},
        {"prompt": [{"role": "user", "content": "x"}],
         "privileged_context": [{"role": "user", "content": "hint"}, {"role": "assistant", "content": "b"}]}]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_tokenizer):
    """Our LoRA model (random LoRA B) and its saved adapter, on the tiny Llama."""
    root = tmp_path_factory.mktemp("sdft")
    return (*saved_lora_adapter(root, tiny_tokenizer), root)


def _both(policy, tmp_path, rows=ROWS, **cfg):
    from trl.experimental.sdft import SDFTConfig as TRLConfig, SDFTTrainer as TRLTrainer

    return both(policy, tmp_path, SDFTTrainer, SDFTConfig, TRLTrainer, TRLConfig, rows, G, **cfg)


CASES = {"topk": dict(distillation_topk=5), "topk-tail": dict(distillation_topk=7, distillation_add_tail=True),
         "full-jsd": dict(distillation_mode="full_logits", temperature=0.7),
         "full-forward-kl": dict(distillation_mode="full_logits", distillation_alpha=0.0),
         "sampled-token": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
         "live-skip": dict(teacher_model_kind="live", num_loss_tokens_to_skip=1, distillation_topk=5),
         "chat": dict(distillation_mode="full_logits", teacher_prompt_template="Context: {privileged_context}\n"
                                                                             "{prompt}"),
         "reused-samples": dict(num_iterations=2, distillation_is_clip=1.01, distillation_topk=5)}


@pytest.mark.parametrize("case", CASES)
def test_step_equals_trl(policy, tmp_path, case):
    """One micro-batch (both prompts' completions) on a policy moved away from its starting adapter: the loss, every
    LoRA gradient and the distillation metric (with reused samples the policy moves after sampling, so the capped
    importance weights act)."""
    model = policy[0]
    rows = CHAT if case == "chat" else ROWS
    ours, theirs = _both(policy, tmp_path, rows, **CASES[case])
    one_step_both(model, ours, theirs, rows, G, reused=case == "reused-samples")
    for name in ("self_distillation/distillation_loss", "sdft/distillation_loss"):
        s, n = ours._ratios[name][-1]
        assert float(s / n) == pytest.approx(theirs._metrics["train"][name][-1], rel=1e-4, abs=1e-7)


def test_teacher_prompts_equal_trls(policy, tmp_path):
    """The teacher's rows (prompt + privileged context by the template, chat prompts through the last user
    message) equal TRL's, token for token."""
    ours, theirs = _both(policy, tmp_path, CHAT)
    batch = ours.score(ours.train_examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]
    inputs = theirs._prepare_training_batch([dict(r) for r in CHAT for _ in range(G)])
    assert torch.equal(batch["teacher_input_ids"], inputs["teacher_input_ids"])
    assert torch.equal(batch["teacher_attention_mask"], inputs["teacher_attention_mask"])


def test_ema_teacher(policy, tmp_path):
    """teacher_model_kind="ema": the teacher starts as the base (a zero adapter), and after each sync step moves to
    (1 - rate) x itself + rate x the adapter; its forward is the model's with those weights."""
    model, tok, _ = policy
    args = SDFTConfig(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1, max_completion_length=5, teacher_model_kind="ema",
                      teacher_update_rate=0.5)
    trainer = SDFTTrainer(model, processing_class=tok, train_dataset=ROWS, args=args)
    batch = trainer.score(trainer.train_examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [8])[0]
    ids, att = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        with trainer.teacher():
            start = model(input_ids=ids, attention_mask=att).logits
        with adapters_disabled(model):
            base = model(input_ids=ids, attention_mask=att).logits
        torch.testing.assert_close(start, base)
        trainer.ema.blend(0.5)
        trainer.ema.blend(0.5)
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(torch.allclose(trainer.ema.saved[n], 0.75 * v) for n, v in lora.items())
        with trainer.teacher():
            moved = model(input_ids=ids, attention_mask=att).logits
        with restored(model):
            for n, p in model.named_parameters():
                if n in lora:
                    p.mul_(0.75)
            want = model(input_ids=ids, attention_mask=att).logits
        torch.testing.assert_close(moved, want)
        assert all(torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)  # swapped back


def test_accumulation_averages_micro_batches(policy, tmp_path):
    """Two micro-batches give the mean of their own losses' gradients, as one micro-batch of both does."""
    model, tok, _ = policy
    model.train()
    with restored(model):
        args = SDFTConfig(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, max_completion_length=5, distillation_topk=5)
        ours = SDFTTrainer(model, processing_class=tok, train_dataset=ROWS, args=args)
        with torch.no_grad():  # the student away from its base teacher
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        truncated = [256 not in c for c in COMPLETIONS]
        two = ours.score(ours.train_examples, COMPLETIONS, truncated, [4, 4])
        one = ours.score(ours.train_examples, COMPLETIONS, truncated, [8])[0]
        model.zero_grad(set_to_none=True)
        for b in two:
            ours.micro_batch_loss(b, 1)[0].backward()
        split = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        ours.micro_batch_loss(one, 1)[0].backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(split[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_config_and_data_errors(policy, tmp_path):
    cfg = SDFTConfig(output_dir=str(tmp_path))
    assert (cfg.num_generations, cfg.distillation_mode, cfg.distillation_topk, cfg.distillation_alpha,
            cfg.distillation_is_clip, cfg.teacher_model_kind, cfg.max_prompt_length, cfg.disable_dropout) == (
        8, "topk_logits", 100, 0.5, 2.0, "base", 512, True)
    for kw, match in ((dict(distillation_mode="x"), "distillation_mode"),
                      (dict(distillation_alpha=1.5), "0 \\(forward"),
                      (dict(distillation_mode="sampled_token"), "distillation_alpha=1.0"),
                      (dict(distillation_topk=0), "distillation_topk"), (dict(teacher_model_kind="y"), "one of"),
                      (dict(teacher_update_rate=0.0), "teacher_update_rate"),
                      (dict(teacher_prompt_template="{prompt}"), "both"), (dict(beta=0.1), "does not apply"),
                      (dict(distillation_is_clip=0.0), "cap must be > 0")):
        with pytest.raises(ConfigError, match=match):
            SDFTConfig(output_dir=str(tmp_path), **kw)
    model, tok, root = policy
    args = SDFTConfig(output_dir=str(tmp_path), num_generations=G, max_completion_length=5)
    with pytest.raises(DataError, match="Row 1 .*privileged_context"):
        SDFTTrainer(model, processing_class=tok, train_dataset=[ROWS[0], {"prompt": "x"}], args=args)
    with pytest.raises(DataError, match="last message is not the user's"):
        SDFTTrainer(model, processing_class=tok, args=args, train_dataset=[
            {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "privileged_context": "c"}])
    with pytest.raises(ConfigError, match="more than the vocabulary"):
        SDFTTrainer(model, processing_class=tok, train_dataset=ROWS, args=SDFTConfig(
            output_dir=str(tmp_path), num_generations=G, max_completion_length=5, distillation_topk=1000))
    full, _ = FastLanguageModel.from_pretrained(str(root / "llama"), dtype="float32")
    with pytest.raises(ConfigError, match="needs LoRA adapters"):
        SDFTTrainer(full, processing_class=tok, train_dataset=ROWS, args=args)


def test_a_sampled_run_with_evaluation(policy, tmp_path):
    """Two steps with the real sampler (teacher: the EMA of the adapter, sampled from the teacher's prompt), then
    evaluate(): finite losses and TRL's metrics."""
    model, tok, _ = policy
    with restored(model):
        args = SDFTConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                          gradient_accumulation_steps=1, max_completion_length=4, max_steps=2, learning_rate=1e-2,
                          logging_steps=1, seed=0, teacher_model_kind="ema", generate_from_teacher=True,
                          distillation_topk=8, per_device_eval_batch_size=4)
        trainer = SDFTTrainer(model, processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS, args=args)
        trainer.train()
        metrics = trainer.evaluate()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert {"sdft/distillation_loss", "self_distillation/distillation_loss", "completions/mean_length"} <= set(logs[0])
    assert math.isfinite(metrics["eval_loss"]) and "eval_sdft/distillation_loss" in metrics


def test_cli(policy, tmp_path):
    from fasttune.cli import main

    _, _, root = policy
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    rc = main(["train", "--model", str(root / "llama"), "--method", "sdft", "--data", str(tmp_path / "rows.jsonl"),
               "--num-generations", "2", "--max-completion-length", "3", "--distillation-topk", "10",
               "--teacher-model-kind", "live", "--per-device-train-batch-size", "2", "--max-steps", "1",
               "--output-dir", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
