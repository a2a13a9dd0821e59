"""fasttune train: runs end to end on a tiny model; user errors are one paragraph, exit 2, no output left."""
import json
import subprocess
import sys

import pytest
from chat_rows import write_chat_rows

from fasttune.cli import main


_rows = write_chat_rows


def test_train_tiny_model_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(_rows(tmp_path / "d.jsonl")),
               "--output-dir", str(out), "--max-steps", "3", "--lr", "1e-2", "--batch-size", "2",
               "--grad-accum", "1", "--lora-r", "4", "--train-on-responses-only"])
    assert rc == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "tokenizer.json").exists()
    assert (out / "loss.png").stat().st_size > 1000
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(tiny_model_dir("llama").resolve())
    assert "Sample after training" in capsys.readouterr().out
    # what `fasttune export --imatrix` measures on by default
    assert json.loads((out / "fasttune_run.json").read_text()) == {
        "method": "sft", "data": str((tmp_path / "d.jsonl").resolve())}


@pytest.mark.parametrize("quant, kind", [("int4", "nf4"), ("int8", "int8"), ("fp8", "fp8")])
def test_train_quantized_base(quant, kind, tiny_model_dir, tmp_path, capsys):
    import torch

    from fasttune import FastLanguageModel

    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(_rows(tmp_path / "d.jsonl")),
               "--output-dir", str(out), "--max-steps", "2", "--lora-r", "4", "--quantization", quant])
    assert rc == 0
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert all(h["grad_norm"] > 0 for h in log)
    model, _ = FastLanguageModel.from_pretrained(str(out / "adapter"), load_in_4bit=kind == "nf4",
                                                 load_in_8bit=kind == "int8", load_in_fp8=kind == "fp8")
    assert model.model.layers[0].mlp.up_proj.base_layer.quant_type == kind
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_offload_embedding_trains_the_same_and_is_refused_for_tied_heads(tiny_model_dir, tmp_path, capsys):
    """--offload-embedding gives the losses of the GPU table (here the CPU, where it is the same lookup); a model
    whose LM head is tied to the embedding is refused before training, leaving nothing behind."""
    data = _rows(tmp_path / "d.jsonl")
    logs = []
    for flags, out in (([], tmp_path / "plain"), (["--offload-embedding"], tmp_path / "host"),
                       (["--offload-embedding", "--offload-lm-head"], tmp_path / "host_head")):
        assert main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--output-dir", str(out),
                     "--max-steps", "2", "--lora-r", "4", "--no-sample", *flags]) == 0
        logs.append([json.loads(x)["loss"] for x in (out / "log_history.jsonl").read_text().splitlines()])
    assert logs[0] == logs[1] and len(logs[0]) == 2
    assert logs[2] == pytest.approx(logs[0], rel=1e-5)  # the streamed head's online softmax: same loss to fp32
    capsys.readouterr()
    out = tmp_path / "tied"
    assert main(["train", "--model", str(tiny_model_dir("qwen2")), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--offload-embedding"]) == 2
    err = capsys.readouterr().err
    assert "offload_embedding=True: this model ties its LM head to the input embedding" in err
    assert "Traceback" not in err and not out.exists()


def test_yaml_config_and_flag_override(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir('llama')}\nlearning-rate: 0.005\nlora_r: 8\n"
                                       f"max_steps: 2\n")
    rc = main(["train", "--config", str(tmp_path / "run.yaml"), "--lora-r", "4", "--print-config"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "learning_rate: 0.005" in printed and "lora_r: 4" in printed


@pytest.mark.parametrize("make_args, match", [
    (lambda d, t: ["--model", str(t / "missing")], "does not exist"),
    (lambda d, t: ["--model", str(d("llama")), "--data", str(t / "nope.jsonl")], "nope.jsonl"),
    (lambda d, t: ["--model", str(d("llama")), "--data", str(_bad_columns(t))], "column"),
    (lambda d, t: ["--model", str(_t5(t))], "'t5' is not supported"),  # gpt2 trains: tests/cli/test_cli_fallback.py
    (lambda d, t: ["--config", str(_yaml(t, "lerning_rate: 1\n"))], "Did you mean 'learning_rate'"),
    (lambda d, t: ["--lr-scheduler-type", "wavy"], "wavy"),
    (lambda d, t: ["--method", "ppo"], "ppo"),
    (lambda d, t: ["--method", "dpo"], "needs --data"),
    (lambda d, t: ["--quantization", "int2"], "int2"),
])
def test_user_errors(make_args, match, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--output-dir", str(out), "--max-steps", "1"] + make_args(tiny_model_dir, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
    assert not out.exists()


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fasttune.cli", "train", "--model", str(tmp_path / "none"),
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def _bad_columns(t):
    p = t / "bad.jsonl"
    p.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    return p


def _t5(t):
    """An architecture neither our decoder nor transformers' AutoModelForCausalLM can train."""
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(t / "t5")
    return t / "t5"


def _yaml(t, text):
    (t / "c.yaml").write_text(text)
    return t / "c.yaml"


def test_use_dora_flag(tiny_model_dir, tmp_path):
    """--use-dora trains DoRA layers and writes a DoRA adapter (use_dora and the magnitudes, PEFT's keys)."""
    from safetensors.torch import load_file

    out = tmp_path / "dora"
    assert main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(_rows(tmp_path / "d.jsonl")),
                 "--output-dir", str(out), "--max-steps", "2", "--lora-r", "4", "--no-sample", "--use-dora"]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert any(k.endswith("q_proj.lora_magnitude_vector") for k in load_file(out / "adapter" /
                                                                            "adapter_model.safetensors"))
