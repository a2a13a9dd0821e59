"""report_to: TensorBoard event files hold the trainer's log entries; W&B gets them too; missing packages and
unknown names are clear errors."""
import importlib.machinery
import sys
import types

import pytest

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError
from fasttune.train.reporters import parse_report_to, scalars


def _trainer(folder, out, **cfg):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    rows = [{"text": f"sample {i} " + "abc " * (1 + i % 4)} for i in range(8)]
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                     learning_rate=1e-2, max_steps=3, **cfg)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, eval_dataset=rows[:2], args=args)


def test_tensorboard_event_file_holds_the_log(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tiny_model_dir("llama"), tmp_path / "out", report_to="tensorboard", eval_steps=2)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "out" / "runs"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = [(h["step"], h["loss"]) for h in trainer.log_history if "loss" in h]
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert {"train/learning_rate", "train/grad_norm", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 3]  # at eval_steps and at the end


def test_wandb_gets_each_entry(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _trainer(tiny_model_dir("llama"), tmp_path / "out", report_to=["wandb"]).train()
    assert calls[0][0] == "init" and calls[0][1]["config"]["learning_rate"] == 1e-2
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 3]  # 3 steps, then the final eval
    assert "train/loss" in calls[1][2] and "eval/loss" in calls[-2][2] and calls[-1] == ("finish",)


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        SFTConfig(report_to="tensorboard")


@pytest.mark.parametrize("value, expected", [("none", []), (None, []), ([], []), ("tensorboard", ["tensorboard"]),
                                             ("none,tensorboard", ["tensorboard"]), (["tensorboard"], ["tensorboard"])])
def test_report_to_values(value, expected):
    pytest.importorskip("tensorboard")
    assert parse_report_to(value) == expected


def test_unknown_integration_is_an_error():
    with pytest.raises(ConfigError, match="'comet' is not available"):
        SFTConfig(report_to="tensorboard,comet")


def test_scalar_names():
    assert scalars({"step": 3, "loss": 1.5, "eval_loss": 2.0, "learning_rate": 1e-3, "note": "x"}) == {
        "train/loss": 1.5, "eval/loss": 2.0, "train/learning_rate": 1e-3}


def test_cli_report_to_tensorboard(tiny_model_dir, tmp_path):
    import json

    from fasttune.cli import main

    pytest.importorskip("tensorboard")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"row {i} abc"}) for i in range(4)))
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--output-dir",
               str(tmp_path / "o"), "--max-steps", "2", "--no-sample", "--report-to", "tensorboard"])
    assert rc == 0 and list((tmp_path / "o" / "runs").glob("events.out.tfevents.*"))
