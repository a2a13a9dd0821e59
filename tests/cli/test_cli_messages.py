"""What fasttune prints: the end-of-run summary (first and last step's loss, "1 step"), the loss plot of a short run,
the quantization in the train banner, the adapter in the chat/generate banners."""
import json
import re

import pytest
from chat_rows import write_chat_rows

from fasttune.cli import main
from fasttune.wording import plural


_rows = write_chat_rows


def _train(model_dir, tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["train", "--model", str(model_dir), "--data", str(_rows(tmp_path / "d.jsonl")), "--output-dir",
               str(out), "--lora-r", "4", "--no-sample", "--lr", "5e-2", "--batch-size", "2", *extra])
    assert rc == 0
    return out


def test_plural():
    assert plural(1, "step") == "1 step" and plural(0, "step") == "0 steps" and plural(4, "step") == "4 steps"
    assert plural(2, "entry", "entries") == "2 entries"


def test_summary_reports_the_first_and_last_step_loss(tiny_model_dir, tmp_path, capsys):
    """With logging_steps=5 over 4 steps the log holds one window mean; the summary still shows step 1 -> step 4."""
    model = tiny_model_dir("llama")
    _train(model, tmp_path, "a", "--max-steps", "4", "--logging-steps", "5")
    summary = re.search(r"fasttune: 4 steps in \d+s, loss ([\d.]+) -> ([\d.]+),", capsys.readouterr().out)
    assert summary, "no summary line"
    per_step = tmp_path / "b"  # the same run, logged every step
    _train(model, tmp_path, "b", "--max-steps", "4", "--logging-steps", "1")
    log = [json.loads(x)["loss"] for x in (per_step / "log_history.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[0] != log[-1]
    assert summary.groups() == (f"{log[0]:.3f}", f"{log[-1]:.3f}")


def test_trainer_metrics_carry_first_and_last_step_loss(tiny_model_dir, tmp_path):
    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=3, logging_steps=1, learning_rate=5e-2,
                     per_device_train_batch_size=2)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=str(_rows(tmp_path / "d.jsonl")), args=args)
    metrics = trainer.train()
    assert metrics["first_step_loss"] == trainer.log_history[0]["loss"]
    assert metrics["last_step_loss"] == trainer.log_history[-1]["loss"]


def test_one_step_run_says_step_and_plots_its_point(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):  # look at what is drawn, then save as usual
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    out = _train(tiny_model_dir("llama"), tmp_path, "o", "--max-steps", "1")
    assert "fasttune: 1 step in " in capsys.readouterr().out
    assert (out / "loss.png").exists()
    (loss_line,) = [line for line in saved[0].axes[0].lines if line.get_label() == "train loss"]
    assert len(loss_line.get_xdata()) == 1 and loss_line.get_marker() not in (None, "None", "", " ")


@pytest.mark.parametrize("name", ["int4", "4bit"])  # autotrain's name; load_in_4bit's
def test_train_banner_names_the_quantization(name, tiny_model_dir, tmp_path, capsys):
    _train(tiny_model_dir("llama"), tmp_path, "o", "--max-steps", "1", "--quantization", name)
    assert re.search(r"fasttune: model .*\(llama, torch\.float32, cpu, int4 NF4 frozen weights\)",
                     capsys.readouterr().out)


@pytest.fixture
def adapter(tiny_model_dir, tmp_path):
    from fasttune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4).save_pretrained(tmp_path / "adapter", tok)
    return tmp_path / "adapter"


def test_generate_and_chat_banners_name_the_adapter(adapter, tiny_model_dir, capsys, monkeypatch):
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert f"with adapter {adapter}" in capsys.readouterr().err
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert main(["chat", "--model", str(tiny_model_dir("llama")), "--adapter", str(adapter)]) == 0
    assert re.match(rf"fasttune chat with .*llama-0 with adapter {re.escape(str(adapter))}\.",
                    capsys.readouterr().out)


def test_one_missing_tensor_is_singular(tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from fasttune import FastLanguageModel
    from fasttune.errors import ModelLoadError

    folder = tiny_model_dir("llama")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"checkpoint lacks 1 tensor the config needs, e\.g\. model\.norm\.weight"):
        FastLanguageModel.from_pretrained(str(folder))


def test_sample_before_training_decodes_the_base_and_leaves_the_adapters_on(tiny_model_dir):
    """The demo's before-sample runs with the fresh LoRA layers switched off (their B is 0, so the reply is the
    base model's) and switches them back on for training."""
    import torch

    from fasttune import FastLanguageModel
    from fasttune.cli import _sample
    from fasttune.generate import generate_text
    from fasttune.peft.lora import lora_layers

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    base_reply = generate_text(model, tok, "q1")
    model = FastLanguageModel.get_peft_model(model, r=4)
    layers = [m for _, m in lora_layers(model)]
    with torch.no_grad():  # a non-zero update: only switching the layers off gives the base reply back
        for m in layers:
            m.lora_B.normal_(0, 5.0)
    assert _sample(model, tok, "q1") != base_reply  # (the update changes the reply)
    assert _sample(model, tok, "q1", base_only=True) == base_reply
    assert layers and not any(m.disabled for m in layers)
