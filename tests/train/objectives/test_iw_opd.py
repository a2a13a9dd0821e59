"""IW-OPD against TRL 1.16's experimental IWOPDTrainer (the student a PEFT twin carrying our adapter, the teacher a
wider transformers model with our teacher's weights): on the same completions, its loss (given our normaliser, the
step's completion tokens), the LoRA gradients and its iw_opd/* metrics, at two gammas and temperatures; the JSD
objective; prompt-only conversations, a sampled run with evaluation, the errors and the CLI."""
import json
import math
import warnings

import pytest
import torch
from peft_oracle import peft_grads, peft_twin, saved_lora_adapter
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel, IWOPDConfig, IWOPDTrainer
from fasttune.errors import ConfigError

pytest.importorskip("trl")
TEACHER = dict(hidden_size=96, intermediate_size=160)  # a wider teacher, the same vocabulary
ROWS = [{"messages": [{"role": "user", "content": f"Q{i}: {w}?"},
                      {"role": "assistant", "content": "yes " * (1 + i % 3)}]}
        for i, w in enumerate(["alpha", "beta", "gamma", "delta"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("iw_opd")
    save_hf(hf_model("llama", seed=1, **TEACHER), root / "teacher", tiny_tokenizer)
    return root, saved_lora_adapter(root, tiny_tokenizer, "student")[1]


def _ours(root, tok, tmp_path, rows=ROWS, **cfg):
    model, _ = FastLanguageModel.from_pretrained(str(root / "adapter"), dtype="float32")
    cfg = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_completion_length": 6,
           "max_steps": 1, "shuffle": False, **cfg}
    return IWOPDTrainer(model, str(root / "teacher"), processing_class=tok, train_dataset=rows,
                        args=IWOPDConfig(output_dir=str(tmp_path / "ours"), **cfg))


@pytest.mark.parametrize("cfg", [dict(), dict(iw_opd_gamma=2.0, temperature=0.7),
                                 dict(distillation_objective="jsd", loss_top_k=0, beta=0.5, lmbda=0.0)],
                         ids=["default", "gamma-temperature", "jsd"])
def test_loss_equals_trl(setup, tmp_path, cfg):
    """TRL's compute_loss on its collated rows (their dataset completions), given the completion tokens as its
    normaliser, against ours on the same completions."""
    from datasets import Dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.iw_opd import IWOPDConfig as TRLConfig, IWOPDTrainer as TRLTrainer

    root, tok = setup
    ours = _ours(root, tok, tmp_path, **cfg)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                     per_device_train_batch_size=4, save_strategy="no", max_completion_length=6, **cfg)
    theirs = TRLTrainer(model=peft_twin("llama", root / "adapter"), teacher_model=str(root / "teacher"),
                        args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    inputs = theirs.data_collator(ROWS)
    examples = ours.train_examples
    completions = [ex["completion_ids"] for ex in examples]
    for ex, ids, labels in zip(examples, inputs["input_ids"], inputs["labels"]):  # TRL's tokens and split
        assert ids[labels != -100].tolist() == ex["completion_ids"]
    batch = ours.to_device(ours.score(examples, completions, [False] * 4, [4])[0])
    num_items = int(batch["completion_mask"].sum())
    loss, _ = ours.micro_batch_loss(batch, num_items)
    loss.backward()
    got = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    want = theirs.compute_loss(theirs.model, inputs, num_items_in_batch=num_items)
    want.backward()
    want_grads = peft_grads(theirs.model)
    assert abs(float(loss)) > 1e-5
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert set(got) == set(want_grads) and got
    for n in got:
        torch.testing.assert_close(got[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    if cfg.get("distillation_objective") != "jsd":
        stats = theirs._metrics["train"]
        for name in ("mean_advantage", "mean_abs_advantage", "mean_weight", "min_weight", "max_weight"):
            s, n = ours._ratios[f"iw_opd/{name}"][-1]
            assert float(s / n) == pytest.approx(stats[f"iw_opd/{name}"][-1], rel=1e-4, abs=1e-6), name


def test_prompt_only_rows_a_run_and_evaluation(setup, tmp_path):
    """Conversations ending with the user's turn train on the student's samples (two steps), and evaluate() samples
    the eval prompts: finite losses and TRL's metrics."""
    root, tok = setup
    rows = [{"messages": r["messages"][:1]} for r in ROWS]
    trainer = _ours(root, tok, tmp_path, rows, max_steps=2, max_completion_length=4, logging_steps=1,
                    learning_rate=1e-2, per_device_eval_batch_size=4)
    assert all(ex["completion_ids"] == [] for ex in trainer.train_examples)
    trainer.eval_examples = trainer.prepare(rows)
    trainer.train()
    metrics = trainer.evaluate()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert {"iw_opd/mean_weight", "iw_opd/max_weight", "completions/mean_length"} <= set(logs[0])
    assert math.isfinite(metrics["eval_loss"]) and "eval_iw_opd/mean_advantage" in metrics


def test_config_errors_and_defaults(tmp_path):
    cfg = IWOPDConfig(output_dir=str(tmp_path))
    assert (cfg.lmbda, cfg.beta, cfg.temperature, cfg.top_p, cfg.learning_rate, cfg.max_completion_length,
            cfg.max_new_tokens, cfg.max_prompt_length, cfg.iw_opd_gamma) == (1.0, 1.0, 1.0, 0.95, 1e-6, 512, 512,
                                                                             512, 0.5)
    assert IWOPDConfig(output_dir=str(tmp_path), max_new_tokens=64).max_completion_length == 64
    for kw, match in ((dict(lmbda=0.5), "needs lmbda=1.0"), (dict(reverse_kl_top_1_mode="argmax"), "sampled"),
                      (dict(distillation_objective="jsd"), "loss_top_k=0"), (dict(distillation_objective="x"), "'jsd'"),
                      (dict(iw_opd_gamma=-1.0), "iw_opd_gamma"),
                      (dict(max_completion_length=1024), "below max_length")):
        with pytest.raises(ConfigError, match=match):
            IWOPDConfig(output_dir=str(tmp_path), **kw)


def test_cli(setup, tmp_path):
    from fasttune.cli import main

    root, _ = setup
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"messages": r["messages"][:1]}) for r in ROWS))
    rc = main(["train", "--model", str(root / "adapter"), "--method", "iw_opd", "--data", str(tmp_path / "rows.jsonl"),
               "--teacher-model-name-or-path", str(root / "teacher"), "--max-completion-length", "3",
               "--per-device-train-batch-size", "2", "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
