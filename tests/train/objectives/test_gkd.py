"""GKD against TRL 1.16's experimental GKDTrainer (the student a PEFT twin carrying our adapter, the teacher a wider
transformers model with the same weights as ours): on the dataset's completions (lmbda=0) the tokens of its
DataCollatorForChatML, the loss and the LoRA gradients for the forward KL, the JSD and the reverse KL; the sources of
the completions (student, teacher, dataset) per micro-batch; evaluation; the errors; the CLI."""
import json
import warnings

import pytest
import torch
from peft_oracle import peft_grads, peft_twin, saved_lora_adapter
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel, GKDConfig, GKDTrainer
from fasttune.errors import ConfigError, DataError

pytest.importorskip("trl")
TEACHER = dict(hidden_size=96, intermediate_size=160)  # a wider teacher, the same vocabulary
ROWS = [{"messages": [{"role": "user", "content": f"Q{i}: {w}?"},
                      {"role": "assistant", "content": "yes " * (1 + i % 3)}]}
        for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 2)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("gkd")
    save_hf(hf_model("llama", seed=1, **TEACHER), root / "teacher", tiny_tokenizer)
    return root, saved_lora_adapter(root, tiny_tokenizer, "student")[1]


def _ours(root, tok, tmp_path, rows=ROWS, **cfg):
    model, _ = FastLanguageModel.from_pretrained(str(root / "adapter"), dtype="float32")
    cfg = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_new_tokens": 6,
           "max_steps": 1, "shuffle": False, **cfg}
    return GKDTrainer(model, str(root / "teacher"), processing_class=tok, train_dataset=rows,
                      args=GKDConfig(output_dir=str(tmp_path / "ours"), **cfg))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_dataset_completions_equal_trl(setup, tmp_path, beta):
    from datasets import Dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig as TRLConfig, GKDTrainer as TRLTrainer

    root, tok = setup
    ours = _ours(root, tok, tmp_path, lmbda=0.0, beta=beta)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False, lmbda=0.0,
                     beta=beta, per_device_train_batch_size=4, save_strategy="no")
    theirs = TRLTrainer(model=peft_twin("llama", root / "adapter"), teacher_model=hf_model("llama", seed=1, **TEACHER),
                        args=args, train_dataset=Dataset.from_list(ROWS[:4]), processing_class=tok)
    inputs = theirs.data_collator(ROWS[:4])
    examples = ours.train_examples[:4]
    for ex, ids, labels in zip(examples, inputs["input_ids"], inputs["labels"]):  # TRL's tokens and split
        real = ids[inputs["input_ids"].shape[1] - len(ex["prompt_ids"]) - len(ex["completion_ids"]):].tolist()
        assert real == ex["prompt_ids"] + ex["completion_ids"]
        assert int((labels != -100).sum()) == len(ex["completion_ids"])
    batch = ours.to_device(ours.rollout(examples, [4], 0)[0])
    num_items = int(batch["completion_mask"].sum())
    loss, _ = ours.micro_batch_loss(batch, num_items)
    loss.backward()
    got = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    want = theirs.compute_loss(theirs.model, inputs)
    want.backward()
    want_grads = peft_grads(theirs.model)
    assert float(loss) > 1e-4
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert set(got) == set(want_grads) and got
    for n in got:
        torch.testing.assert_close(got[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_completion_sources_per_micro_batch(setup, tmp_path):
    """lmbda=1: the student samples every completion; seq_kd: the teacher samples the others; lmbda=0.5 over many
    micro-batches: both the student's and the dataset's, each micro-batch whole; evaluation: the dataset's."""
    root, tok = setup
    data = [ex["completion_ids"] for ex in _ours(root, tok, tmp_path, lmbda=0.0).train_examples]

    def sources(trainer, sizes, seed=0):
        examples = trainer.train_examples[:sum(sizes)]
        calls = []
        real = trainer.sample
        trainer.sample = lambda exs, s, model=None: calls.append((len(exs), model)) or real(exs, s, model=model)
        batches = trainer.rollout(examples, sizes, seed)
        got = [row[-m.shape[0]:][m.bool()].tolist() for b in batches
               for row, m in zip(b["input_ids"], b["completion_mask"])]
        return [c == d for c, d in zip(got, data)], calls

    same, calls = sources(_ours(root, tok, tmp_path, lmbda=1.0), [4])
    assert calls == [(4, None)] and not all(same)
    teacher = _ours(root, tok, tmp_path, lmbda=0.0, seq_kd=True)
    same, calls = sources(teacher, [4])
    assert calls == [(4, teacher.teacher)]
    mixed = _ours(root, tok, tmp_path, lmbda=0.5)
    seen = set()
    for seed in range(6):
        same, _ = sources(mixed, [2, 2], seed)
        assert same[0] == same[1] and same[2] == same[3]  # one source per micro-batch
        seen |= {same[0], same[2]}
    assert seen == {True, False}
    on_policy = _ours(root, tok, tmp_path, lmbda=1.0)
    on_policy.eval_examples = on_policy.train_examples[:4]
    assert on_policy.evaluate()["eval_loss"] > 0
    reference = _ours(root, tok, tmp_path, lmbda=0.0)
    batch = reference.to_device(reference.rollout(reference.train_examples[:4], [4], 0)[0])
    with torch.no_grad():
        want, _ = reference.micro_batch_loss(batch, int(batch["completion_mask"].sum()))
    assert on_policy.evaluate()["eval_loss"] == pytest.approx(float(want), rel=1e-5)


def test_training_runs_and_prompt_completion_rows(setup, tmp_path):
    root, tok = setup
    rows = [{"prompt": f"Say {w}:", "completion": f" {w}!"} for w in ("a", "bb", "ccc", "dd")]
    trainer = _ours(root, tok, tmp_path, rows=rows, max_steps=2, per_device_train_batch_size=2, lmbda=0.5)
    assert tok.decode(trainer.train_examples[1]["completion_ids"]) == " bb!"
    trainer.train()
    assert [h["step"] for h in trainer.log_history if "loss" in h] == [1, 2]


@pytest.mark.parametrize("rows, kw, error, match", [
    (ROWS, dict(lmbda=1.5), ConfigError, "lmbda=1.5 is invalid"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {}, DataError, "last one is the assistant's"),
    ([{"text": "hi"}], {}, DataError, "'messages'"),
    ([{"messages": [{"role": "user", "content": "hi " * 400}, {"role": "assistant", "content": "ok"}]}],
     dict(max_seq_length=64), DataError, "must fit max_seq_length=64")])
def test_errors_name_the_fix(setup, tmp_path, rows, kw, error, match):
    root, tok = setup
    with pytest.raises(error, match=match):
        _ours(root, tok, tmp_path, rows=rows, **kw)


def test_cli_method_gkd(setup, tmp_path, capsys):
    from fasttune.cli import main

    root, _ = setup
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "out"
    assert main(["train", "--method", "gkd", "--model", str(root / "student"), "--teacher-model-name-or-path",
                 str(root / "teacher"), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lora-r", "4", "--lmbda", "0.5", "--max-new-tokens", "4", "--no-sample"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert main(["train", "--method", "gkd", "--data", str(data), "--output-dir", str(tmp_path / "x")]) == 2
    assert "--teacher-model-name-or-path" in capsys.readouterr().err


def test_a_template_whose_prompt_is_no_prefix_warns_and_splits_as_trl(setup, tmp_path):
    """A chat template that renders the assistant's header differently with add_generation_prompt: one warning, and
    the split at the rendered prompt's length, as TRL's collator makes it."""
    import copy

    root, tok = setup
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "a long answer"}]}]
    with pytest.warns(UserWarning, match="without the rendered prompt as its start"):
        trainer = _ours(root, tok, tmp_path, rows=rows * 2, per_device_train_batch_size=2)
    text = tok.apply_chat_template(rows[0]["messages"][:-1], add_generation_prompt=True, tokenize=False)
    assert len(trainer.train_examples[0]["prompt_ids"]) == len(text)  # one byte a token
