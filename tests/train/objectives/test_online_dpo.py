"""Online DPO: TRL 1.16's experimental OnlineDPOTrainer (on a PEFT twin carrying our adapter, its sampler replaced by
fixed completions through a subclass hook) is the oracle for one micro-batch's pair choice, loss, LoRA gradients
and metrics (sigmoid and IPO, a missing-EOS penalty that flips a choice, prompts cut to max_length); plus the
summed gradients over accumulation, the config's errors, a short run and the CLI."""
import json
import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS
from peft_oracle import peft_grads, peft_twin, saved_lora_adapter
from preference_oracle import restored, shift_policy

from fasttune import FastLanguageModel, OnlineDPOConfig, OnlineDPOTrainer
from fasttune.errors import ConfigError

trl = pytest.importorskip("trl")
PAIRS = COMPLETIONS[:4]  # prompt 0: [ab<eos>, a<eos>]; prompt 1: [bbba<eos>, cdefg (no stop token)]


def distinct(prompts, completions, **_):
    """The number of distinct characters: 2 / 1 for prompt 0's pair, 2 / 5 for prompt 1's."""
    return [float(len(set(c))) for c in completions]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_tokenizer):
    """Our LoRA model (random LoRA B) and its saved adapter, on the tiny Llama."""
    root = tmp_path_factory.mktemp("online_dpo")
    return (*saved_lora_adapter(root, tiny_tokenizer), root)


def _fixed_trl():
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLOnlineDPO
    from trl.experimental.utils import truncate_right

    class FixedCompletionsOnlineDPO(TRLOnlineDPO):
        """TRL's trainer whose two completions per prompt are PAIRS (its layout: every prompt's first, then every
        prompt's second)."""

        def _generate(self, model, prompts, images=None):
            enc = self.processing_class(text=list(prompts), return_tensors="pt", padding=True, padding_side="left",
                                        add_special_tokens=False)
            firsts, seconds = PAIRS[0::2], PAIRS[1::2]
            width = max(len(c) for c in PAIRS)
            pad = self.processing_class.pad_token_id
            ids = torch.tensor([c + [pad] * (width - len(c)) for c in firsts + seconds])
            ids, mask = truncate_right(ids, self.eos_token_ids, pad)
            return enc["input_ids"].repeat(2, 1), enc["attention_mask"].repeat(2, 1), ids, mask, None

    return FixedCompletionsOnlineDPO


def _both(policy, tmp_path, **cfg):
    from datasets import Dataset

    model, tok, root = policy
    common = dict(per_device_train_batch_size=len(ROWS), gradient_accumulation_steps=1, max_new_tokens=6,
                  learning_rate=1e-3, **cfg)
    ours = OnlineDPOTrainer(model, reward_funcs=[distinct], processing_class=tok, train_dataset=ROWS,
                            args=OnlineDPOConfig(output_dir=str(tmp_path / "ours"), shuffle=False, **common))
    theirs = _fixed_trl()(model=peft_twin("llama", root / "adapter"), reward_funcs=[distinct], processing_class=tok,
                          train_dataset=Dataset.from_list(ROWS),
                          args=trl.experimental.online_dpo.OnlineDPOConfig(
                              output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                              **common))
    return ours, theirs


@pytest.mark.parametrize("cfg", [dict(), dict(loss_type="ipo", beta=0.5), dict(missing_eos_penalty=3.0),
                                 dict(max_length=7)], ids=["sigmoid", "ipo", "eos-penalty", "max-length"])
def test_step_equals_trl(policy, tmp_path, cfg):
    """The pair choice (prompt 1's second completion wins on distinct characters unless the missing-EOS penalty
    takes 3 off it: then a tie, and the first is chosen), the loss, every LoRA gradient and TRL's metrics."""
    model = policy[0]
    with restored(model):
        ours, theirs = _both(policy, tmp_path, **cfg)
        shift_policy(model, theirs.model)  # away from the reference (the adapter as handed over, on both sides)
        examples = ours.train_examples[:len(PAIRS)]
        batch = ours.score(examples, PAIRS, [256 not in c for c in PAIRS], [len(PAIRS)])[0]
        assert batch["chosen"].tolist() == ([0, 0] if "missing_eos_penalty" in cfg else [0, 1])
        model.zero_grad(set_to_none=True)
        loss, _ = ours.micro_batch_loss(batch, ours.count_items(batch))
        loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        theirs.model.train()
        want_loss = theirs.training_step(theirs.model, {"prompt": [r["prompt"] for r in ROWS],
                                                        "answer": [r["answer"] for r in ROWS]})
        want = peft_grads(theirs.model)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-7)
    assert abs(float(loss)) > 1e-4 and set(got) == set(want) and len(got) > 0
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    stats = theirs.stats  # (TRL's objective/kl, entropy, non_score_reward and rlhf_reward also sum the padding
    # after a completion's stop token; ours count the completion's tokens only, so those are not compared)
    # rewards are beta * (log p - reference log p) of a policy shifted only slightly: the subtraction cancels most
    # digits, so their tolerance is fp32 rounding of the log-probs themselves (which differs across CPUs' kernels)
    logps = max(abs(stats[k][-1]) for k in ("logps/chosen", "logps/rejected"))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        s, n = ours._ratios[name][-1]
        rounding = 1e-5 * stats["beta"][-1] * logps if name.startswith("rewards") else 1e-6
        assert float(s / n) == pytest.approx(stats[name][-1], rel=1e-4, abs=max(1e-6, rounding)), name
    for name in ("objective/scores", "objective/scores_margin", "val/contain_eos_token", "beta"):
        assert ours._metrics[name][-1] == pytest.approx(stats[name][-1], rel=1e-5, abs=1e-6), name


def test_accumulated_micro_batches_sum_their_gradients(policy, tmp_path):
    """Two micro-batches of one pair each give the sum of their own gradients (TRL's training_step: no division by
    gradient_accumulation_steps), and the logged step loss is their mean."""
    model, tok, _ = policy
    with restored(model):
        args = OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                               max_new_tokens=6, shuffle=False)
        ours = OnlineDPOTrainer(model, reward_funcs=[distinct], processing_class=tok, train_dataset=ROWS, args=args)
        with torch.no_grad():  # the policy away from its reference
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        batches = ours.score(ours.train_examples[:4], PAIRS, [256 not in c for c in PAIRS], [2, 2])
        grads, parts, losses = [], [], []
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss, part = ours.micro_batch_loss(b, 1)
            loss.backward()
            losses.append(float(loss))
            parts.append(float(part))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        for b in batches:
            ours.micro_batch_loss(b, 1)[0].backward()
        both = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert sum(parts) == pytest.approx(sum(losses) / 2)
    for n, g in both.items():
        torch.testing.assert_close(g, grads[0][n] + grads[1][n], rtol=1e-5, atol=1e-7)


def test_config_errors_and_defaults(tmp_path, policy):
    cfg = OnlineDPOConfig(output_dir=str(tmp_path))
    assert (cfg.num_generations, cfg.beta, cfg.max_completion_length, cfg.max_length, cfg.temperature,
            cfg.learning_rate, cfg.loss_type, cfg.disable_dropout) == (2, 0.1, 64, 512, 0.9, 5e-7, "sigmoid", True)
    assert OnlineDPOConfig(output_dir=str(tmp_path), beta="0.2,0.1").betas == [0.2, 0.1]
    for kw, match in ((dict(num_generations=4), "stays 2"), (dict(loss_type="hinge"), "sigmoid"),
                      (dict(beta=0.0), "must be > 0"), (dict(missing_eos_penalty=-1.0), ">= 0"),
                      (dict(num_iterations=2), "does not apply to online DPO"), (dict(beta="x"), "give a number")):
        with pytest.raises(ConfigError, match=match):
            OnlineDPOConfig(output_dir=str(tmp_path), **kw)
    model, tok, _ = policy
    with pytest.raises(ConfigError, match="leave ref_model out"):
        OnlineDPOTrainer(model, ref_model=model, reward_funcs=[distinct], processing_class=tok, train_dataset=ROWS,
                         args=cfg)
    with pytest.raises(ConfigError, match="does not evaluate"):
        OnlineDPOTrainer(model, reward_funcs=[distinct], processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS,
                         args=cfg)


def test_per_epoch_beta_and_a_short_run(policy, tmp_path):
    """A per-epoch beta list takes each epoch's entry; two epochs of sampled pairs train with finite losses and
    TRL's metrics logged."""
    model, tok, _ = policy
    with restored(model):
        args = OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_new_tokens=4,
                               num_train_epochs=2, beta=[0.3, 0.05], learning_rate=1e-2, logging_steps=1, seed=0)
        trainer = OnlineDPOTrainer(model, reward_funcs=[distinct], processing_class=tok, train_dataset=ROWS,
                                   args=args)
        trainer.train()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert [h["beta"] for h in logs] == [0.3, 0.05]
    assert {"objective/kl", "rewards/margins", "objective/scores", "completions/mean_length"} <= set(logs[0])


def test_cli(policy, tmp_path, capsys):
    from fasttune.cli import main

    _, _, root = policy
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    rc = main(["train", "--model", str(root / "llama"), "--method", "online_dpo", "--data",
               str(tmp_path / "prompts.jsonl"), "--reward-funcs", "length", "--max-new-tokens", "4",
               "--per-device-train-batch-size", "2", "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert FastLanguageModel.from_pretrained(str(tmp_path / "run" / "adapter"))[0].lora_settings is not None
