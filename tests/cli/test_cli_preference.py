"""fasttune train --method dpo|orpo|cpo|kto: the method picks the trainer and its config's flags; bad rows exit 2."""
import json

import pytest

from fasttune.cli import main


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _pairs(n=4):
    return [{"prompt": f"Q{i}?", "chosen": " yes" * (1 + i % 2), "rejected": " no"} for i in range(n)]


def test_dpo_trains_and_writes_an_adapter(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--method", "dpo", "--model", str(tiny_model_dir("llama")), "--data",
               str(_jsonl(tmp_path / "p.jsonl", _pairs())), "--output-dir", str(out), "--max-steps", "2",
               "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--beta", "0.2", "--loss-type", "ipo",
               "--no-sample"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2] and "rewards/accuracies" in log[0]


@pytest.mark.parametrize("method, key, value", [("kto", "desirable_weight", "1.5"), ("orpo", "beta", "0.3"),
                                                ("cpo", "simpo_gamma", "0.7"), ("grpo", "num_generations", "4")])
def test_method_config_fields_are_flags_and_yaml_keys(method, key, value, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"method: {method}\n{key}: {value}\ndata: d.jsonl\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 0
    assert f"{key}: {value}" in capsys.readouterr().out
    assert main(["train", "--method", method, "--data", "d.jsonl", f"--{key.replace('_', '-')}", value,
                 "--print-config"]) == 0
    assert f"{key}: {value}" in capsys.readouterr().out


def test_simpo_trains_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--method", "cpo", "--loss-type", "simpo", "--cpo-alpha", "0", "--model",
               str(tiny_model_dir("llama")), "--data", str(_jsonl(tmp_path / "p.jsonl", _pairs())), "--output-dir",
               str(out), "--max-steps", "2", "--batch-size", "2", "--lora-r", "4", "--no-sample"])
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[0]["nll_loss"] == 0 and "rewards/margins" in log[0]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_bad_preference_row_is_named(tiny_model_dir, tmp_path, capsys):
    rows = _pairs(3)
    rows[2]["rejected"] = ""
    out = tmp_path / "out"
    rc = main(["train", "--method", "dpo", "--model", str(tiny_model_dir("llama")), "--data",
               str(_jsonl(tmp_path / "p.jsonl", rows)), "--output-dir", str(out), "--max-steps", "1", "--no-sample"])
    err = capsys.readouterr().err
    assert rc == 2 and "Row 2 of p.jsonl" in err and "'rejected'" in err and "Traceback" not in err
    assert not out.exists()
