"""Trainer core: resume, eval, logging files, non-finite steps and config errors."""
import json

import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError


def _rows(n=12):
    return [{"text": f"sample {i} " + "abc " * (1 + i % 5)} for i in range(n)]


def _trainer(folder, out, dropout=0.0, **cfg):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=1e-2, **cfg)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_is_exact(tiny_model_dir, tmp_path):
    """Dropout > 0 makes the RNG state matter; 7 steps cross an epoch boundary (3 steps per epoch)."""
    folder = tiny_model_dir("llama")
    full = _trainer(folder, tmp_path / "a", dropout=0.1, max_steps=7, save_steps=2)
    full.train()
    assert (tmp_path / "a" / "checkpoint-4" / "adapter" / "adapter_config.json").exists()
    resumed = _trainer(folder, tmp_path / "a", dropout=0.1, max_steps=7, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    losses = lambda t: [h["loss"] for h in t.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed) == losses(full)
    # TRL's num_tokens counts from the run's start, across the resume
    tokens = lambda t: [h["num_tokens"] for h in t.log_history if "loss" in h]  # noqa: E731
    assert tokens(resumed) == tokens(full) and tokens(full)[-1] > tokens(full)[0] > 0
    a, b = _trainable(full.model), _trainable(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_resume_true_picks_latest_and_save_total_limit(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    _trainer(folder, tmp_path / "o", max_steps=7, save_steps=2, save_total_limit=2).train()
    # the last step's checkpoint too, as transformers saves it; the limit keeps the newest two
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    t = _trainer(folder, tmp_path / "o", max_steps=7)
    t.train(resume_from_checkpoint=True)
    assert [h["step"] for h in t.log_history if "loss" in h][-1] == 7


def test_resume_without_checkpoint_is_clear(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=2).train(resume_from_checkpoint=True)


def test_resume_with_other_rank_is_refused(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    _trainer(folder, tmp_path / "o", max_steps=3, save_steps=2).train()
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=8)
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(),
                   args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=3))
    with pytest.raises(ConfigError, match="LoRA rank"):
        t.train(resume_from_checkpoint=True)


def test_eval_and_log_file(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=4, eval_steps=2, learning_rate=1e-2,
                     logging_steps=2)
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), eval_dataset=_rows(4), args=args)
    metrics = t.train()
    lines = [json.loads(x) for x in (tmp_path / "o" / "log_history.jsonl").read_text().splitlines()]
    assert lines == t.log_history
    assert [h["step"] for h in lines if "loss" in h] == [2, 4]
    # eval_steps divides max_steps: the final eval is step 4's, run and logged once
    assert [h["step"] for h in lines if "eval_loss" in h] == [2, 4]
    assert metrics["eval_loss"] == lines[-1]["eval_loss"] > 0
    assert {"learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= set(lines[0])


def _mean_token_loss(model, tok, rows):
    """Mean next-token cross-entropy over every token of the rows (text + EOS), one unpadded row at a time
    through the model's forward: independent of the trainer's batching, padding and chunked loss."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tok(row["text"])["input_ids"] + [tok.eos_token_id]])
            logits = model(ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    model.train(was_training)
    return total / count


def test_eval_loss_is_the_mean_token_loss(tiny_model_dir, tmp_path):
    """Each eval point's eval_loss is the mean token loss of the eval set under the weights of that moment; here
    eval_steps does not divide max_steps, so the final eval (step 3) is a point of its own."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=3, eval_steps=2, learning_rate=1e-2,
                     per_device_eval_batch_size=3)
    eval_rows = _rows(5)  # different lengths, in batches of 3 and 2: padding and a short last batch
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), eval_dataset=eval_rows, args=args)
    expected, evaluate = [], t.evaluate

    def checked_evaluate():
        expected.append(_mean_token_loss(t.model, tok, eval_rows))
        return evaluate()

    t.evaluate = checked_evaluate
    metrics = t.train()
    evals = [h for h in t.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 3] and len(expected) == 2 and expected[0] != expected[1]
    for h, want in zip(evals, expected):
        assert h["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_loss"] == evals[-1]["eval_loss"]


def test_nonfinite_loss_stops_with_message(tiny_model_dir, tmp_path):
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=3, max_nonfinite_steps=2)
    with torch.no_grad():
        t.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(Exception, match="NaN/inf for 2 steps"):
        t.train()


def test_no_trainable_params_is_clear(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=SFTConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        t.train()


@pytest.mark.parametrize("kw, match", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"), ({"lr_scheduler_type": "wavy"}, "wavy"),
    ({"optim": "sgdm"}, "optim"), ({"learning_rate": -1.0}, "learning_rate"), ({"packing": "maybe"}, "packing"),
    ({"max_steps": -1, "num_train_epochs": 0}, "nothing to train"),
    ({"max_steps": 0}, r"max_steps=0 is invalid: give the number of optimizer steps \(>= 1\), or -1"),
    ({"max_steps": -2}, r"max_steps=-2 is invalid"), ({"save_steps": -1}, r"save_steps=-1 is invalid"),
    ({"warmup_steps": -5}, r"warmup_steps=-5 is invalid"), ({"eval_steps": 0}, r"eval_steps=0 is invalid"),
    ({"save_total_limit": 0}, r"save_total_limit=0 is invalid"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**kw)


def test_config_from_dict_suggests_nearest_key():
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        SFTConfig.from_dict({"learning_rat": 1e-4})


def test_bf16_flag_with_fp32_model_is_clear(tiny_model_dir, tmp_path, capsys):
    """bf16=True with an fp32 model is an error; fp16=True on a CPU (the notebooks' `fp16=not is_bf16_supported()`)
    trains in fp32 with a notice, as transformers' and TRL's trainers accept it there. train() returns the metrics
    as a dict that also reads as transformers' TrainOutput (the notebooks' trainer_stats.metrics["train_runtime"])."""
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=1, bf16=True)
    with pytest.raises(ConfigError, match="dtype='bfloat16'"):
        t.train()
    stats = _trainer(tiny_model_dir("llama"), tmp_path / "p", max_steps=2, fp16=True).train()
    assert "fp16=True has no effect on the CPU" in capsys.readouterr().err
    assert stats.global_step == stats["global_step"] == 2 and stats.metrics["train_runtime"] > 0
    assert stats.training_loss == stats["train_loss"] and isinstance(stats, dict)


def test_full_finetuning_trains_all_and_saves_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(),
                   args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=2, learning_rate=1e-3))
    t.train()
    model.save_pretrained(tmp_path / "full", tok)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_data_seed_orders_the_data(tiny_model_dir, tmp_path):
    """transformers' data_seed: the shuffle follows it instead of seed; unset, the order is seed's."""
    folder = tiny_model_dir("llama")
    order = {name: _trainer(folder, tmp_path / name, max_steps=1, **kw).epoch_order(0)
             for name, kw in {"seed7": dict(seed=7), "data7": dict(data_seed=7), "data8": dict(data_seed=8),
                              "plain": {}}.items()}
    assert order["data7"] == order["seed7"] != order["plain"]
    assert order["data8"] != order["data7"] and sorted(order["data8"]) == list(range(len(_rows())))


def test_tf32_sets_torch_flags_on_cuda(monkeypatch):
    from fasttune.train import loop

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        loop._set_tf32(True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        loop._set_tf32(None)  # unset: torch's settings stay
        assert torch.backends.cuda.matmul.allow_tf32
        loop._set_tf32(False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_steps_below_one_are_shares_of_the_run(tiny_model_dir, tmp_path):
    """transformers' logging/save/eval steps below 1: ceil(share x total steps), in the loop and in the callbacks'
    TrainerState."""
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=8, logging_steps=0.25, save_steps=0.5,
                 eval_steps=0.3)
    t.train()
    assert [h["step"] for h in t.log_history if "loss" in h] == [2, 4, 6, 8]
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (t.callbacks.state.logging_steps, t.callbacks.state.save_steps, t.callbacks.state.eval_steps) == (2, 4, 3)


@pytest.mark.parametrize("kw, match", [
    ({"logging_steps": 1.5}, r"logging_steps=1\.5 is invalid: it must be a whole number"),
    ({"logging_steps": 0}, r"logging_steps=0 is invalid: it must be a whole number >= 1, or a share"),
    ({"eval_steps": 0.0}, r"eval_steps=0 is invalid"), ({"save_steps": -0.5}, r"save_steps=-0\.5"),
])
def test_bad_step_shares(kw, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**kw)


def test_evaluate_takes_transformers_arguments(tiny_model_dir, tmp_path):
    """evaluate(eval_dataset=..., metric_key_prefix=...), a dict of named sets, and a trainer built without one."""
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=1)  # no eval_dataset
    with pytest.raises(ConfigError, match="needs an eval_dataset"):
        t.evaluate()
    short, long = _rows(4), [{"text": "abc " * 20 + str(i)} for i in range(3)]
    a, b = t.evaluate(short), t.evaluate(eval_dataset=long, metric_key_prefix="test", ignore_keys=["past"])
    token_keys = ("entropy", "mean_token_accuracy", "num_tokens")  # TRL's SFT metrics
    assert set(a) == {"eval_loss", *(f"eval_{k}" for k in token_keys)}
    assert set(b) == {"test_loss", *(f"test_{k}" for k in token_keys)} and a["eval_loss"] != b["test_loss"]
    both = t.evaluate({"short": short, "long": long})
    assert both == {**{f"eval_short_{k}": a[f"eval_{k}"] for k in ("loss", *token_keys)},
                    **{f"eval_long_{k}": b[f"test_{k}"] for k in ("loss", *token_keys)}}
    with pytest.raises(ConfigError, match="hyperparameter search"):
        t.train(trial={"learning_rate": 1e-3})


def test_logging_first_step_and_eval_on_start(tiny_model_dir, tmp_path):
    """transformers' logging_first_step logs step 1 too; eval_on_start logs an evaluation at step 0."""
    folder = tiny_model_dir("llama")
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                     max_steps=4, logging_steps=3, logging_first_step=True, eval_on_start=True)
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), eval_dataset=_rows(2), args=args)
    t.train()
    assert [h["step"] for h in t.log_history if "loss" in h] == [1, 3, 4]
    assert [h["step"] for h in t.log_history if "eval_loss" in h] == [0, 4]
    with pytest.raises(ConfigError, match="eval_on_start=True .* needs an eval_dataset"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
