"""SDPO: TRL 1.16's experimental SDPOTrainer (on a PEFT twin carrying our adapter, its sampler replaced by fixed
completions through a subclass hook) is the oracle for the teachers' prompts and one micro-batch's loss, LoRA
gradients and metrics: self-distillation alone, mixed with the policy loss, the policy loss alone, feedback, chat
prompts, sequence-level ratios and reused samples; plus the config's errors, the diagnostics' warnings, a short run
with evaluation and the CLI."""
import json
import math

import pytest
import torch
from grpo_oracle import COMPLETIONS
from peft_oracle import saved_lora_adapter
from preference_oracle import restored
from self_distillation_oracle import both, one_step_both

from fasttune import SDPOConfig, SDPOTrainer
from fasttune.errors import ConfigError

trl = pytest.importorskip("trl")
G = 4  # completions per prompt: prompt 0's [ab<eos>, a<eos>, bbba<eos>, cdefg], prompt 1's [b<eos>, ab<eos>, b<eos>,
# xy<eos>]; exact answers: completion 0 (its group's only success: not distilled, as it may not teach itself), 4 and 6
ROWS = [{"prompt": "add: 1+1", "answer": "ab", "privileged_context": "too long"},
        {"prompt": "x", "answer": "b", "privileged_context": ""}]
CHAT = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add: 1+1"}],
         "answer": "ab", "privileged_context": "too long"},
        {"prompt": [{"role": "user", "content": "x"}], "answer": "b", "privileged_context": ""}]


def exact(prompts, completions, answer, **_):
    return [float((c if isinstance(c, str) else c[-1]["content"]) == a) for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_tokenizer):
    """Our LoRA model (random LoRA B) and its saved adapter, on the tiny Llama."""
    root = tmp_path_factory.mktemp("sdpo")
    return (*saved_lora_adapter(root, tiny_tokenizer), root)


def _both(policy, tmp_path, rows=ROWS, **cfg):
    from trl.experimental.sdpo import SDPOConfig as TRLConfig, SDPOTrainer as TRLTrainer

    return both(policy, tmp_path, SDPOTrainer, SDPOConfig, TRLTrainer, TRLConfig, rows, G, reward_funcs=[exact], **cfg)


CASES = {"distill": dict(teacher_model_kind="base"),
         "mixed-topk": dict(teacher_model_kind="live", distillation_mode="topk_logits", distillation_topk=5,
                            distillation_alpha=0.5, distillation_weight=0.5, loss_type="grpo"),
         "feedback-sequence": dict(teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=0.3,
                                   distillation_weight=0.3, importance_sampling_level="sequence", loss_type="dr_grpo",
                                   include_environment_feedback=True, environment_feedback_only_without_solution=True,
                                   temperature=0.8),
         "policy-only": dict(teacher_model_kind="base", distillation_weight=0.0, loss_type="bnpo",
                             scale_rewards="batch"),
         "chat-self": dict(teacher_model_kind="base", dont_reprompt_on_self_success=False, distillation_weight=0.5,
                           success_reward_threshold=0.5),
         "reused-samples": dict(teacher_model_kind="base", num_iterations=2, distillation_weight=0.5, epsilon=0.01,
                                distillation_is_clip=1.01),
         "reused-sequence": dict(teacher_model_kind="base", num_iterations=2, distillation_weight=0.5, epsilon=0.001,
                                 importance_sampling_level="sequence", loss_type="grpo")}
METRICS = ("self_distillation/success_group_fraction", "self_distillation/success_sample_fraction",
           "self_distillation/feedback_available_fraction", "self_distillation/feedback_used_fraction",
           "self_distillation/reprompt_sample_fraction", "self_distillation/reward_mean",
           "self_distillation/reward_std", "self_distillation/reward_min", "self_distillation/reward_max",
           "self_distillation/group_reward_std_mean", "self_distillation/flat_group_fraction",
           "self_distillation/rewards/exact")


@pytest.mark.parametrize("case", CASES)
def test_step_equals_trl(policy, tmp_path, case):
    """The teachers' rows token for token, then one micro-batch on a policy moved away from its starting adapter:
    the loss, every LoRA gradient and TRL's metrics (with reused samples the policy moves after sampling, so the
    clipped ratios and the capped importance weights act)."""
    model = policy[0]
    rows = CHAT if case.startswith("chat") else ROWS
    ours, theirs = _both(policy, tmp_path, rows, **CASES[case])

    def same_teachers(batch, inputs):
        assert torch.equal(batch["teacher_input_ids"], inputs["teacher_input_ids"])
        assert batch["distilled"].tolist() == inputs["self_distillation_mask"].tolist()

    one_step_both(model, ours, theirs, rows, G, reused=case.startswith("reused"), check=same_teachers)
    stats = theirs._metrics["train"]
    for name in METRICS:
        assert ours._metrics[name][-1] == pytest.approx(stats[name][-1], rel=1e-5, abs=1e-7), name
    for name in ("self_distillation/distillation_loss", "sdpo/distillation_loss", "self_distillation/policy_loss"):
        if name in stats:
            s, n = ours._ratios[name][-1]
            assert float(s / n) == pytest.approx(stats[name][-1], rel=1e-4, abs=1e-7), name
        else:
            assert name not in ours._ratios, name


def test_config_errors_and_defaults(tmp_path):
    cfg = SDPOConfig(output_dir=str(tmp_path))
    assert (cfg.distillation_mode, cfg.distillation_alpha, cfg.distillation_weight, cfg.teacher_model_kind,
            cfg.loss_type, cfg.num_generations, cfg.distillation_topk) == ("sampled_token", 1.0, 1.0, "ema", "dapo",
                                                                           8, None)
    assert SDPOConfig(output_dir=str(tmp_path), scale_rewards=False).scale_rewards == "none"
    for kw, match in ((dict(loss_type="cispo"), "loss_type"), (dict(distillation_weight=2.0), "distillation_weight"),
                      (dict(distillation_mode="topk_logits"), "needs distillation_topk"),
                      (dict(reprompt_template="{question}"), "does not format"), (dict(beta=0.1), "no KL term"),
                      (dict(max_reprompt_len=0), "max_reprompt_len"), (dict(scale_rewards="x"), "scale_rewards")):
        with pytest.raises(ConfigError, match=match):
            SDPOConfig(output_dir=str(tmp_path), **kw)


def test_a_chat_prompt_must_end_with_the_user(policy, tmp_path):
    from fasttune.errors import DataError

    model, tok, _ = policy
    rows = [{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": "b"}]
    with pytest.raises(DataError, match="Row 0.*last message is not the user's"):
        SDPOTrainer(model, reward_funcs=[exact], processing_class=tok, train_dataset=rows,
                    args=SDPOConfig(output_dir=str(tmp_path), num_generations=G, max_completion_length=5))


def test_degenerate_steps_warn(policy, tmp_path):
    """Flat rewards and no successful completion warn on the first such step (TRL's diagnostics)."""
    model, tok, _ = policy

    def zero(completions, **_):
        return [0.0] * len(completions)

    args = SDPOConfig(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1, max_completion_length=5)
    trainer = SDPOTrainer(model, reward_funcs=[zero], processing_class=tok, train_dataset=ROWS, args=args)
    with pytest.warns(UserWarning) as caught:
        batch = trainer.score(trainer.train_examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [8])[0]
    text = " ".join(str(w.message) for w in caught)
    assert "same SDPO reward" in text and "no successful completion" in text and "inactive" in text
    assert "include_environment_feedback=False" in text  # row 0 has feedback, unused
    assert batch["distilled"].sum() == 0


def test_a_sampled_run_with_evaluation(policy, tmp_path):
    """Two steps with the real sampler (the default EMA teacher, half policy loss), then evaluate(): finite losses
    and TRL's metrics."""
    model, tok, _ = policy
    with restored(model):
        args = SDPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                          gradient_accumulation_steps=1, max_completion_length=4, max_steps=2, learning_rate=1e-2,
                          logging_steps=1, seed=0, distillation_weight=0.5, success_reward_threshold=0.0,
                          per_device_eval_batch_size=4)
        trainer = SDPOTrainer(model, reward_funcs=["length"], processing_class=tok, train_dataset=ROWS,
                              eval_dataset=ROWS, args=args)
        trainer.train()
        metrics = trainer.evaluate()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert {"sdpo/distillation_loss", "self_distillation/policy_loss", "self_distillation/reprompt_sample_fraction",
            "completions/mean_length"} <= set(logs[0])
    assert logs[0]["self_distillation/reprompt_sample_fraction"] == 1.0  # threshold 0: every sibling succeeds
    assert math.isfinite(metrics["eval_loss"]) and "eval_sdpo/distillation_loss" in metrics


def test_cli(policy, tmp_path):
    from fasttune.cli import main

    _, _, root = policy
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    rc = main(["train", "--model", str(root / "llama"), "--method", "sdpo", "--data", str(tmp_path / "rows.jsonl"),
               "--reward-funcs", "exact_match", "--num-generations", "2", "--max-completion-length", "3",
               "--distillation-weight", "0.5", "--per-device-train-batch-size", "2", "--max-steps", "1",
               "--output-dir", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
