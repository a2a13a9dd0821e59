"""A2PO: TRL 1.16's experimental A2POTrainer (on a PEFT twin carrying our adapter, both samplers giving the same fixed
completions per prompt) is the oracle for stage 1 (each prompt's V*, the prompts filtered out) and for one micro-batch
of stage 2 (the loss, every LoRA gradient, the metrics); plus gradient accumulation's mean, evaluation, the config's
errors, a short sampled run and the CLI."""
import copy
import json
import math

import pytest
import torch
from peft_oracle import peft_grads, peft_twin, saved_lora_adapter
from preference_oracle import restored, shift_policy

from fasttune import A2POConfig, A2POTrainer, FastLanguageModel
from fasttune.errors import ConfigError, DataError

trl = pytest.importorskip("trl")
ROWS = [{"prompt": "add: 1+1", "answer": "ab"}, {"prompt": "x", "answer": "b"}, {"prompt": "zz", "answer": "q"}]
# Fixed completions (byte ids; 256 = <|endoftext|>, the stop token; the one without it is max_completion_length long)
# by prompt: stage 1's three reference samples, then stage 2's one policy sample.
STAGE1 = {"add: 1+1": [[97, 98, 256], [97, 256], [98, 98, 98, 97, 256]],  # "ab", "a", "bbba": rewards 1, 0, 0
          "x": [[98, 256], [99, 100, 101, 102, 103], [98, 98, 98, 97, 256]],  # 1, 0, 1
          "zz": [[97, 256], [98, 256], [120, 256]]}  # all 0: dropped by filter_all_incorrect
STAGE2 = {"add: 1+1": [97, 98, 256], "x": [99, 100, 101, 102, 103]}  # rewards 1, 0
WIDTH = 5


def contains_answer(prompts, completions, answer, **_):
    """1 when the completion (decoded text, as TRL's A2PO passes it) holds the row's answer, else 0."""
    assert all(isinstance(c, str) for c in completions)
    return [float(a in c) for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_tokenizer):
    """Our LoRA model (random LoRA B, so the reference is a copy of the adapter) and its saved adapter."""
    root = tmp_path_factory.mktemp("a2po")
    return (*saved_lora_adapter(root, tiny_tokenizer), root)


class FixedA2PO(A2POTrainer):
    """Our trainer whose sampler returns the fixed completions of each prompt (stage 1's while the reference is
    active)."""

    _in_stage1 = False

    def sample(self, examples, seed, model=None):
        out, used = [], {}
        for ex in examples:
            text = ex["prompt"]
            k = used[text] = used.get(text, -1) + 1
            out.append(list(STAGE1[text][k]) if self._in_stage1 else list(STAGE2[text]))
        return out, [256 not in c for c in out]

    def _estimate(self, prompts, across_ranks):
        self._in_stage1 = True
        try:
            return super()._estimate(prompts, across_ranks)
        finally:
            self._in_stage1 = False


def _fake_generate(tok, table):
    """A generate() for TRL's models: each left-padded prompt's fixed completions (num_return_sequences of them, in
    order), padded to WIDTH."""
    def generate(input_ids, attention_mask, generation_config, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = tok.decode(ids[mask.bool()].tolist())
            n = generation_config.num_return_sequences
            for c in (table[text] if n > 1 else [table[text]])[:n]:
                rows.append(torch.cat([ids, torch.tensor(c + [tok.pad_token_id] * (WIDTH - len(c)))]))
        return torch.stack(rows)
    return generate


def _both(policy, tmp_path, rows=ROWS, **cfg):
    from datasets import Dataset
    from trl.experimental.a2po import A2POConfig as TRLConfig, A2POTrainer as TRLTrainer

    model, tok, root = policy
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_completion_length=WIDTH,
                  num_value_samples=3, learning_rate=1e-3, **cfg)
    ours = FixedA2PO(model, reward_funcs=[contains_answer], processing_class=tok, train_dataset=rows,
                     args=A2POConfig(output_dir=str(tmp_path / "ours"), shuffle=False, **common))
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    theirs = TRLTrainer(model=peft_twin("llama", root / "adapter"), reward_funcs=[contains_answer],
                        processing_class=left, train_dataset=Dataset.from_list(rows),
                        args=TRLConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                                       gradient_checkpointing=False, **common))
    theirs.ref_model.generate = _fake_generate(left, STAGE1)  # (the oracle's sampler, replaced on its instances)
    theirs.model.generate = _fake_generate(left, STAGE2)
    return ours, theirs


@pytest.mark.parametrize("cfg", [dict(), dict(beta1=0.1, beta2=0.05, reward_weights=[2.0], temperature=0.7)],
                         ids=["defaults", "settings"])
def test_stage1_and_a_step_equal_trl(policy, tmp_path, cfg):
    """Stage 1: every prompt's V* and the prompt dropped ("zz": all its samples scored 0); stage 2 on a policy
    moved away from its reference: the loss, every LoRA gradient and TRL's metrics (the log-probs at temperature 1
    whatever the sampling temperature, as TRL's)."""
    model = policy[0]
    with restored(model):
        ours, theirs = _both(policy, tmp_path, **cfg)
        ours.estimate_optimal_values()
        theirs._estimate_optimal_values()
        beta1, w = cfg.get("beta1", 0.5), cfg.get("reward_weights", [1.0])[0]
        want_v = {"add: 1+1": beta1 * (math.log(math.exp(w / beta1) + 2) - math.log(3)),
                  "x": beta1 * (math.log(2 * math.exp(w / beta1) + 1) - math.log(3)), "zz": 0.0}
        assert theirs._optimal_values == pytest.approx(want_v, rel=1e-6)
        got_v = {ex["prompt"]: ours._values[ours._key(ex)] for ex in ours.train_examples}
        assert got_v == pytest.approx({k: v for k, v in want_v.items() if k != "zz"}, rel=1e-6)
        assert [ex["prompt"] for ex in ours.train_examples] == list(theirs.train_dataset["prompt"]) \
            == ["add: 1+1", "x"]
        shift_policy(model, theirs.model)
        examples = ours.train_examples
        batch = ours.score(examples, [STAGE2[ex["prompt"]] for ex in examples], [False, True], [2])[0]
        assert batch["rewards"].tolist() == [w, 0.0]
        model.zero_grad(set_to_none=True)
        loss, _ = ours.micro_batch_loss(batch, ours.count_items(batch))
        loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        theirs.model.train()
        inputs = theirs._prepare_inputs([dict(r) for r in ROWS[:2]])
        want_loss = theirs.compute_loss(theirs.model, inputs)
        want_loss.backward()
        want = peft_grads(theirs.model)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-7)
    assert float(loss.detach()) > 1e-3 and set(got) == set(want) and len(got) > 0
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    stats = theirs._metrics["train"]
    for name in ("reward", "v_star", "implicit_reward", "advantage"):
        s, n = ours._ratios[name][-1]
        assert float(s / n) == pytest.approx(stats[name][-1], rel=1e-4, abs=1e-7), name
    assert abs(stats["implicit_reward"][-1]) > 1e-6  # the policy moved from its reference


def test_accumulation_averages_micro_batches(policy, tmp_path):
    """Two micro-batches of one prompt each give the mean of their own gradients (transformers' Trainer divides
    each micro-batch's loss by gradient_accumulation_steps), and the logged step loss is their mean."""
    model, tok, _ = policy
    with restored(model):
        args = A2POConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                          max_completion_length=WIDTH, num_value_samples=3, shuffle=False)
        ours = FixedA2PO(model, reward_funcs=[contains_answer], processing_class=tok, train_dataset=ROWS, args=args)
        ours.estimate_optimal_values()
        model.train()
        with torch.no_grad():  # the policy away from its reference
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        examples = ours.train_examples
        batches = ours.score(examples, [STAGE2[ex["prompt"]] for ex in examples], [False, True], [1, 1])
        one = ours.score(examples, [STAGE2[ex["prompt"]] for ex in examples], [False, True], [2])[0]
        grads, parts, losses = [], [], []
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss, part = ours.micro_batch_loss(b, 1)
            loss.backward()
            losses.append(float(loss))
            parts.append(float(part))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        whole, _ = ours.micro_batch_loss(one, 1)
        whole.backward()
        both = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # each micro-batch's mean / 2 (its step's micro-batches): together the mean over both prompts, as one micro-batch
    assert sum(parts) == pytest.approx(sum(losses)) == pytest.approx(float(whole))
    for n, g in both.items():
        torch.testing.assert_close(g, grads[0][n] + grads[1][n], rtol=1e-5, atol=1e-7)


def test_config_errors_and_defaults(tmp_path, policy):
    cfg = A2POConfig(output_dir=str(tmp_path), top_k=None)
    assert (cfg.num_generations, cfg.num_value_samples, cfg.beta1, cfg.beta2, cfg.max_prompt_length, cfg.top_k,
            cfg.filter_all_incorrect, cfg.max_completion_length) == (1, 8, 0.5, 1e-3, 512, 0, True, 256)
    for kw, match in ((dict(num_value_samples=0), "num_value_samples"), (dict(beta1=0.0), "beta1"),
                      (dict(beta2=-1.0), "beta2"), (dict(num_generations=2), "one completion per prompt"),
                      (dict(beta=0.1), "does not apply to A2PO"), (dict(num_iterations=2), "does not apply"),
                      (dict(mask_truncated_completions=True), "does not apply")):
        with pytest.raises(ConfigError, match=match):
            A2POConfig(output_dir=str(tmp_path), **kw)
    _, tok, root = policy
    full, _ = FastLanguageModel.from_pretrained(str(root / "llama"), dtype="float32", full_finetuning=True)
    trainer = A2POTrainer(full, reward_funcs=[contains_answer], processing_class=tok, train_dataset=ROWS, args=cfg)
    assert set(trainer.reference.saved) == {n for n, _ in full.named_parameters()}  # full fine-tuning: every weight


def test_every_prompt_filtered_is_an_error(policy, tmp_path):
    model, tok, _ = policy
    args = A2POConfig(output_dir=str(tmp_path), max_completion_length=WIDTH, num_value_samples=3)
    trainer = FixedA2PO(model, reward_funcs=[contains_answer], processing_class=tok, train_dataset=ROWS[2:], args=args)
    with pytest.raises(DataError, match="no prompt is left"):
        trainer.train()
    kept = FixedA2PO(model, reward_funcs=[contains_answer], processing_class=tok, train_dataset=ROWS[2:],
                     args=A2POConfig(output_dir=str(tmp_path), max_completion_length=WIDTH, num_value_samples=3,
                                     filter_all_incorrect=False))
    kept.estimate_optimal_values()
    assert len(kept.train_examples) == 1 and kept._values[kept._key(kept.train_examples[0])] == 0.0


def test_a_sampled_run_with_evaluation(policy, tmp_path):
    """Stage 1 and two steps with the real sampler, then evaluate() on prompts that include one not seen in stage
    1 (estimated then): finite losses, TRL's metrics logged."""
    model, tok, _ = policy
    with restored(model):
        args = A2POConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=4,
                          num_value_samples=2, max_steps=2, learning_rate=1e-2, logging_steps=1, seed=0,
                          filter_all_incorrect=False, per_device_eval_batch_size=2)
        trainer = A2POTrainer(model, reward_funcs=["length"], processing_class=tok, train_dataset=ROWS[:2],
                              eval_dataset=ROWS[:2], args=args)
        trainer.train()
        metrics = trainer.evaluate(ROWS[1:])
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert {"reward", "v_star", "implicit_reward", "advantage", "completions/mean_length"} <= set(logs[0])
    assert math.isfinite(metrics["eval_loss"]) and "eval_v_star" in metrics
    assert len(trainer._values) == 3  # "zz" estimated when evaluation first met it


def test_conversational_prompts_give_reward_functions_text(policy, tmp_path):
    """TRL's A2PO hands the reward functions decoded text also for chat-message prompts (GRPO: assistant
    messages)."""
    model, tok, _ = policy
    rows = [{"prompt": [{"role": "user", "content": "x"}], "answer": "b"}]
    trainer = A2POTrainer(model, reward_funcs=[contains_answer], processing_class=tok, train_dataset=rows,
                          args=A2POConfig(output_dir=str(tmp_path), max_completion_length=WIDTH))
    assert trainer.compute_rewards(trainer.train_examples * 2, [[98, 256], [97, 256]]).tolist() == [[1.0], [0.0]]


def test_cli(policy, tmp_path):
    from fasttune.cli import main

    _, _, root = policy
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]))
    rc = main(["train", "--model", str(root / "llama"), "--method", "a2po", "--data", str(tmp_path / "prompts.jsonl"),
               "--reward-funcs", "length", "--max-completion-length", "3", "--num-value-samples", "2", "--beta2",
               "0.01", "--filter-all-incorrect", "false", "--per-device-train-batch-size", "2", "--max-steps", "1",
               "--output-dir", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
