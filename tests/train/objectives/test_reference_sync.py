"""TR-DPO's reference syncs (sync_ref_model, reference_sync.py) in DPO, KTO, GRPO and RLOO: a hard sync (alpha 1)
makes the reference the policy, so the next step's log-ratios are 0; a soft sync mixes each adapter weight with
alpha; the synced reference survives a checkpoint and resume; the settings TRL refuses are refused."""
import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS, G
from preference_oracle import lora_pair, pair_rows, unpaired_rows

from fasttune import (DPOConfig, DPOTrainer, FastLanguageModel, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer,
                      RLOOConfig, RLOOTrainer)
from fasttune.errors import ConfigError
from fasttune.train.checkpoint import OBJECTIVE_TENSORS
from fasttune.train.objectives.reference_sync import TENSOR_PREFIX

LN2 = 0.6931471805599453


def _dpo(model, tok, tmp_path, callbacks=None, **kw):
    kw = {"per_device_train_batch_size": 4, "max_steps": 2, "shuffle": False, "learning_rate": 5e-2,
          "logging_steps": 1, "save_strategy": "no", **kw}
    return DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(8), callbacks=callbacks, args=DPOConfig(
        output_dir=str(tmp_path / "out"), **kw))


class Recorder:
    """A TrainerCallback keeping the trainable weights after each optimizer step (on_step_end comes after the sync,
    which reads the same weights)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.weights = []

            def on_step_end(self, args, state, control, model=None, **kw):
                self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

        return _Recorder()


@pytest.mark.parametrize("sync", [True, False])
def test_dpo_hard_sync_makes_the_next_steps_reference_the_policy(sync, tiny_model_dir, tmp_path):
    """alpha 1 every step: step 2's reference is the policy after step 1, the very weights of step 2's forward, so
    its rewards are 0 and its loss ln 2; without the sync they are not."""
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    trainer = _dpo(model, tok, tmp_path, sync_ref_model=sync, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1)
    trainer.train()
    second = [h for h in trainer.log_history if "loss" in h][1]
    if sync:
        assert second["rewards/chosen"] == pytest.approx(0, abs=1e-5)
        assert second["rewards/rejected"] == pytest.approx(0, abs=1e-5)
        assert second["loss"] == pytest.approx(LN2, abs=1e-5)
    else:
        assert abs(second["rewards/chosen"]) > 1e-3 and abs(second["loss"] - LN2) > 1e-4


def test_soft_sync_mixes_every_adapter_weight_and_resumes(tiny_model_dir, tmp_path):
    """alpha 0.6 every 2 steps over 4 (a fresh adapter: the reference starts as the base, LoRA B zero): after step 2
    ref = 0.4 ref0 + 0.6 w2, after step 4 ref = 0.4 ref2 + 0.6 w4, weight by weight. A run resumed from step 2's
    checkpoint (which keeps the synced reference) logs the same losses and ends with the same reference."""
    folder = tiny_model_dir("llama")

    def trainer(recorder=None):
        model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32")
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        t = _dpo(model, tok, tmp_path, max_steps=4, save_steps=2, save_strategy="steps", sync_ref_model=True,
                 ref_model_mixup_alpha=0.6, ref_model_sync_steps=2, callbacks=[recorder] if recorder else None)
        return t, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    recorder = Recorder()
    ours, start = trainer(recorder)
    assert ours.reference.is_copy and all(not w.any() for n, w in ours.reference.saved.items() if "lora_B" in n)
    ours.train()
    w = recorder.weights
    want = {n: 0.4 * (0.4 * start[n] + 0.6 * w[1][n]) + 0.6 * w[3][n] for n in start}
    for n in start:
        torch.testing.assert_close(ours.reference.saved[n], want[n], rtol=1e-6, atol=1e-7)
    kept = (tmp_path / "out" / "checkpoint-2" / OBJECTIVE_TENSORS)
    from safetensors.torch import load_file
    for n, t in load_file(kept).items():
        torch.testing.assert_close(t, 0.4 * start[n.removeprefix(TENSOR_PREFIX)] + 0.6 * w[1][
            n.removeprefix(TENSOR_PREFIX)])
    resumed, _ = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    losses = [h["loss"] for h in ours.log_history if "loss" in h]
    assert [h["loss"] for h in resumed.log_history if "loss" in h] == pytest.approx(losses, rel=1e-5)
    for n in start:
        torch.testing.assert_close(resumed.reference.saved[n], ours.reference.saved[n], rtol=1e-5, atol=1e-7)


def test_resume_refuses_a_checkpoint_without_the_synced_reference(tiny_model_dir, tmp_path):
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    common = dict(save_steps=2, save_strategy="steps", lr_scheduler_type="constant")
    _dpo(model, tok, tmp_path, max_steps=2, **common).train()
    later = _dpo(model, tok, tmp_path, max_steps=4, sync_ref_model=True, ref_model_sync_steps=2, **common)
    with pytest.raises(ConfigError, match="keeps no synced reference"):
        later.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


@pytest.mark.parametrize("sync", [True, False])
def test_kto_hard_sync(sync, tiny_model_dir, tmp_path):
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    trainer = KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(8), args=KTOConfig(
        output_dir=str(tmp_path / "kto"), per_device_train_batch_size=4, max_steps=2, shuffle=False,
        learning_rate=5e-2, logging_steps=1, save_strategy="no", sync_ref_model=sync, ref_model_mixup_alpha=1.0,
        ref_model_sync_steps=1))
    trainer.train()
    second = [h for h in trainer.log_history if "loss" in h][1]
    if sync:
        assert second["kl"] == pytest.approx(0, abs=1e-5) and second["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    else:
        assert abs(second["rewards/chosen"]) > 1e-3


def _fixed(cls):
    class Fixed(cls):
        def sample(self, examples, seed, model=None):
            seen, out = {}, []
            for ex in examples:
                i = seen.setdefault(ex["prompt"], 0)
                seen[ex["prompt"]] += 1
                out.append(COMPLETIONS[(0 if ex["prompt"] == ROWS[0]["prompt"] else G) + i])
            return out, [256 not in c for c in out]

    return Fixed


def _distinct(prompts, completions, **_):
    return [float(len(set(c))) for c in completions]


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("cls, config", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_grpo_and_rloo_hard_sync_zero_the_next_steps_kl(cls, config, sync, tiny_model_dir, tmp_path):
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    trainer = _fixed(cls)(model, reward_funcs=[_distinct], processing_class=tok, train_dataset=ROWS, args=config(
        output_dir=str(tmp_path / "rl"), per_device_train_batch_size=len(COMPLETIONS), num_generations=G,
        max_completion_length=6, max_steps=2, shuffle=False, learning_rate=5e-2, beta=0.1, logging_steps=1,
        save_strategy="no", sync_ref_model=sync, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1))
    trainer.train()
    second = [h for h in trainer.log_history if "loss" in h][1]
    if sync:
        assert second["kl"] == pytest.approx(0, abs=1e-6)
    else:  # the policy moved away from the reference in step 1
        assert abs(second["kl"]) > 1e-5  # RLOO logs the mean log-ratio, of either sign


@pytest.mark.parametrize("config, kw, match", [
    (DPOConfig, dict(ref_model_mixup_alpha=0.0), "ref_model_mixup_alpha=0.0 is invalid"),
    (KTOConfig, dict(ref_model_mixup_alpha=1.5), r"in \(0, 1\]"),
    (GRPOConfig, dict(ref_model_sync_steps=0, beta=0.1), "ref_model_sync_steps=0 is invalid"),
    (RLOOConfig, dict(ref_model_sync_steps=2.5), "whole number"),
    (DPOConfig, dict(sync_ref_model=True, precompute_ref_log_probs=True), "precompute_ref_log_probs=True fixes"),
    (KTOConfig, dict(sync_ref_model=True, precompute_ref_log_probs=True), "precompute_ref_log_probs=True fixes"),
    (GRPOConfig, dict(sync_ref_model=True), "beta=0 takes no reference passes"),  # GRPO's default beta is 0
    (RLOOConfig, dict(sync_ref_model=True, beta=0.0), "beta=0 takes no reference passes"),
])
def test_bad_sync_settings(config, kw, match):
    with pytest.raises(ConfigError, match=match):
        config(output_dir="o", **kw)


def test_dpo_sync_refuses_reference_log_probs_in_the_data(tiny_model_dir, tmp_path):
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    rows = [{**r, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for r in pair_rows(4)]
    with pytest.raises(ConfigError, match="ref_chosen_logps.*Set sync_ref_model=False"):
        DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=DPOConfig(output_dir=str(tmp_path / "o"),
                                                                                  sync_ref_model=True))


def test_cli_trains_dpo_with_syncs_and_refuses_a_bad_alpha(tiny_model_dir, tmp_path, capsys):
    import json

    from fasttune.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(4)))
    common = ["train", "--method", "dpo", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--lora-r",
              "4", "--max-steps", "2", "--sync-ref-model", "--ref-model-sync-steps", "1"]
    assert main(common + ["--output-dir", str(tmp_path / "run"), "--ref-model-mixup-alpha", "0.5"]) == 0, \
        capsys.readouterr().err
    assert any((tmp_path / "run").rglob("adapter_model.safetensors"))
    assert main(common + ["--output-dir", str(tmp_path / "bad"), "--ref-model-mixup-alpha", "2"]) != 0
    err = capsys.readouterr().err
    assert "ref_model_mixup_alpha=2.0 is invalid" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("sync", [False, True])
def test_full_finetuning_dpo_curve_equals_trl(sync, tiny_model_dir, tmp_path):
    """Full fine-tuning: the reference is a second copy of every weight, as TRL's reference model; with
    sync_ref_model (alpha 0.3 every step) TRL mixes that model's weights, which for full weights is what ours does.
    Three steps' logged losses and rewards equal TRL's DPOTrainer train() on a transformers model."""
    import trl
    from datasets import Dataset
    from preference_oracle import trl_args
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama")
    rows = pair_rows(4)
    cfg = dict(max_steps=3, learning_rate=1e-3, beta=0.5, logging_steps=1, sync_ref_model=sync,
               ref_model_mixup_alpha=0.3, ref_model_sync_steps=1)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32", full_finetuning=True)
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=DPOConfig(
        output_dir=str(tmp_path / "ours"), per_device_train_batch_size=4, shuffle=False, save_strategy="no", **cfg))
    assert ours.reference.is_copy and set(ours.reference.saved) == {n for n, _ in model.named_parameters()}
    ours.train()
    twin = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = trl.DPOTrainer(model=twin, args=trl_args(trl.DPOConfig, tmp_path, **cfg),
                            train_dataset=Dataset.from_list(rows), processing_class=tok)
    theirs.train()
    got = [h for h in ours.log_history if "loss" in h]
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == 3 and got[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert (got[2]["loss"] > 0.2) == sync  # a reference that follows the policy keeps the margins small
    for key in ("loss", "rewards/chosen", "rewards/margins"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-4, abs=1e-6), key


def test_full_finetuning_reference_under_fsdp_is_refused(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    from types import SimpleNamespace

    from fasttune.train.objectives.reference_sync import synced_reference

    # (the trainers refuse fsdp=True outside torchrun first: the rule itself, with the run's settings)
    with pytest.raises(ConfigError, match="full fine-tuning under fsdp=True is not implemented"):
        synced_reference(model, SimpleNamespace(fsdp=True, sync_ref_model=False))
    assert synced_reference(model, SimpleNamespace(fsdp=False, sync_ref_model=False)).is_copy


def test_full_finetuning_grpo_with_syncs_equals_trl(tiny_model_dir, tmp_path):
    """GRPO with beta > 0, full fine-tuning, sync_ref_model (alpha 0.3 every step): three steps' loss and KL equal
    TRL's GRPOTrainer on the transformers model with the same fixed completions."""
    import trl
    from datasets import Dataset
    from grpo_oracle import count_a, fixed_completions_trl
    from transformers import AutoModelForCausalLM

    from fasttune.train.rewards import ExactMatch

    folder = tiny_model_dir("llama")
    rewards = [ExactMatch(), count_a]
    cfg = dict(per_device_train_batch_size=len(COMPLETIONS), gradient_accumulation_steps=1, num_generations=G,
               max_completion_length=6, max_steps=3, learning_rate=1e-3, beta=0.2, logging_steps=1,
               sync_ref_model=True, ref_model_mixup_alpha=0.3, ref_model_sync_steps=1)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32", full_finetuning=True)
    ours = _fixed(GRPOTrainer)(model, reward_funcs=rewards, processing_class=tok, train_dataset=ROWS,
                               args=GRPOConfig(output_dir=str(tmp_path / "ours"), shuffle=False, save_strategy="no",
                                               **cfg))
    ours.train()
    theirs = fixed_completions_trl()(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), reward_funcs=list(rewards),
        processing_class=tok, train_dataset=Dataset.from_list(ROWS),
        args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                            shuffle_dataset=False, save_strategy="no", **cfg))
    theirs.train()
    got = [h for h in ours.log_history if "loss" in h]
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == 3 and got[0]["kl"] == pytest.approx(0, abs=1e-7) and got[2]["kl"] > 1e-6
    for key in ("loss", "kl"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-4, abs=1e-7), key
