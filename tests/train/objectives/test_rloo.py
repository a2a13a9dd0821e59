"""RLOO: TRL 1.16's RLOOTrainer (on a PEFT twin carrying our adapter) is the oracle for the leave-one-out advantages
with reward clipping, normalisation and the KL penalty, and for one step's loss and LoRA gradients; plus the config
errors and the CLI."""
import json
import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS, G, assert_step_equals_trl, count_a
from peft_oracle import peft_twin, saved_lora_adapter
from preference_oracle import restored, shift_policy

from fasttune import FastLanguageModel, RLOOConfig, RLOOTrainer
from fasttune.errors import ConfigError
from fasttune.train.rewards import ExactMatch

trl = pytest.importorskip("trl")
REWARDS = [ExactMatch(), count_a]


def distinct(prompts, completions, **_):
    """Differs within a group of sampled completions, so the advantages and the gradients are not zero."""
    return [float(len(set(c))) for c in completions]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_tokenizer):
    """Our LoRA model (random LoRA B) and its saved adapter, on the tiny Llama."""
    root = tmp_path_factory.mktemp("rloo")
    return (*saved_lora_adapter(root, tiny_tokenizer), root)


def _fixed_trl():
    class FixedCompletionsRLOO(trl.RLOOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            return [list(c) for c in COMPLETIONS[:len(prompt_ids)]]

    return FixedCompletionsRLOO


def _both(policy, tmp_path, family="llama", adapter=None, **cfg):
    """Our trainer and TRL's on the same adapter (TRL's with beta > 0 keeps it as its "ref" adapter; `adapter`:
    its folder, default the policy's), their scored batches of the fixed completions."""
    from datasets import Dataset

    model, tok, root = policy
    common = dict(per_device_train_batch_size=len(COMPLETIONS), gradient_accumulation_steps=1, num_generations=G,
                  max_completion_length=6, **cfg)
    ours = RLOOTrainer(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS,
                       args=RLOOConfig(output_dir=str(tmp_path / "ours"), shuffle=False, **common))
    theirs = _fixed_trl()(model=peft_twin(family, adapter or root / "adapter"), reward_funcs=list(REWARDS),
                          processing_class=tok, train_dataset=Dataset.from_list(ROWS),
                          args=trl.RLOOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                                              bf16=False, **common))
    theirs.current_gradient_accumulation_steps = 1
    return ours, theirs


def _score(ours, theirs):
    examples = ours.train_examples[:len(COMPLETIONS)]
    batch = ours.score(examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]
    return batch, theirs._generate_and_score_completions([row for row in ROWS for _ in range(G)])


@pytest.mark.parametrize("cfg", [dict(beta=0.0), dict(beta=0.05, reward_clip_range=(0.0, 1.5)),
                                 dict(beta=0.05, normalize_advantages=True)], ids=["plain", "clip+kl", "normalised"])
def test_advantages_match_trl(policy, tmp_path, cfg):
    with restored(policy[0]):
        ours, theirs = _both(policy, tmp_path, **cfg)
        if cfg["beta"]:  # both took the adapter as handed over as the reference: move the policy away from it
            shift_policy(policy[0], theirs.model)
        got, want = _score(ours, theirs)
    assert got["advantages"].abs().sum() > 0
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-5, atol=1e-5)
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/count_a/mean"):
        assert ours._metrics[name][-1] == pytest.approx(theirs._metrics["train"][name][-1], rel=1e-5, abs=1e-6), name
    if cfg["beta"]:
        s, n = ours._ratios["kl"][-1]
        assert float(s / n) == pytest.approx(theirs._metrics["train"]["kl"][-1], rel=1e-4, abs=1e-6)
        assert abs(float(s / n)) > 1e-4


def test_loss_and_grads_match_trl(policy, tmp_path):
    """One step with the KL penalty and clipping acting (old log-probs moved away from the policy's)."""
    model = policy[0]
    with restored(model):
        ours, theirs = _both(policy, tmp_path, beta=0.05, epsilon=0.1, epsilon_high=0.15)
        shift_policy(model, theirs.model)
        batch, inputs = _score(ours, theirs)
        mask = batch["completion_mask"]
        noise = 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask
        batch["old_logps"] = batch["old_logps"] + noise
        inputs["old_logps"] = (batch["old_logps"] * mask).sum(-1)
        assert_step_equals_trl(model, ours, batch, ours.count_items(batch), theirs, inputs, ["entropy"])


def test_moe_load_balancing_loss_equals_trl(tiny_model_dir, tmp_path):
    """On a mixture-of-experts model TRL 1.16's RLOOTrainer adds router_aux_loss_coef (default: the config's) x the
    policy forward's load-balancing loss to the loss: loss, LoRA gradients and the aux_loss metric equal TRL's."""
    from preference_oracle import attention_lora_pair

    model, tok, _ = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    ours, theirs = _both((model, tok, tmp_path), tmp_path, family="qwen3_moe", adapter=tmp_path / "init", beta=0.05,
                         epsilon=0.1)
    assert ours.aux_weight == model.config.router_aux_loss_coef > 0 and theirs.aux_loss_enabled
    batch, inputs = _score(ours, theirs)
    mask = batch["completion_mask"]
    noise = 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask
    batch["old_logps"] = batch["old_logps"] + noise
    inputs["old_logps"] = (batch["old_logps"] * mask).sum(-1)
    assert_step_equals_trl(model, ours, batch, ours.count_items(batch), theirs, inputs, ["entropy", "aux_loss"])


def test_config_and_cli(policy, tmp_path, capsys):
    """TRL's RLOO defaults, reward_clip_range's forms and errors; `fasttune train --method rloo` trains and saves."""
    from fasttune.cli import main

    cfg = RLOOConfig(output_dir=str(tmp_path), reward_clip_range="-1,2")
    assert (cfg.num_generations, cfg.beta, cfg.reward_clip_range) == (2, 0.05, (-1.0, 2.0))
    with pytest.raises(ConfigError, match="low must be <= high"):
        RLOOConfig(output_dir=str(tmp_path), reward_clip_range=(2, 1))
    with pytest.raises(ConfigError, match="give two numbers"):
        RLOOConfig(output_dir=str(tmp_path), reward_clip_range="1")
    with pytest.raises(ConfigError, match="unknown setting 'loss_type'"):  # GRPO's, not RLOO's (as in TRL)
        RLOOConfig(output_dir=str(tmp_path), loss_type="dapo")
    _, _, root = policy
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    rc = main(["train", "--method", "rloo", "--model", str(root / "llama"), "--data", str(tmp_path / "prompts.jsonl"),
               "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--lora-r", "4", "--batch-size", "4",
               "--grad-accum", "1", "--num-generations", "4", "--max-completion-length", "4",
               "--reward-funcs", "length", "--reward-clip-range", "0,1", "--no-sample"])
    assert rc == 0, capsys.readouterr().err
    logged = [json.loads(line) for line in (tmp_path / "out" / "log_history.jsonl").read_text().splitlines()]
    assert any("kl" in h and "reward" in h for h in logged)


def test_trl_rloo_trainer_runs_on_our_model(policy, tmp_path):
    """TRL's own RLOOTrainer trains fasttune's LoRA model (our generate and forward; the reference with the adapters
    off, through the PEFT-style switch) with only the import of the model changed."""
    from datasets import Dataset

    model, tok = FastLanguageModel.from_pretrained(str(policy[2] / "llama"), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = trl.RLOOTrainer(model=model, processing_class=tok, reward_funcs=[count_a, distinct],
                              train_dataset=Dataset.from_list(ROWS),
                              args=trl.RLOOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                                                  num_generations=2, max_completion_length=6, max_steps=2,
                                                  learning_rate=1e-2, logging_steps=1, report_to="none",
                                                  use_cpu=True, bf16=False))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("kl" in h and h["grad_norm"] > 0 for h in logs)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
