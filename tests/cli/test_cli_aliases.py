"""autotrain-style flags: `autotrain llm --train ...` commands run as `fasttune train ...`."""
import json

import pytest
import yaml

from fasttune.cli import main


def _config(capsys, *args) -> dict:
    assert main(["train", *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _sharegpt(folder, name="train.jsonl", n=6):
    folder.mkdir(exist_ok=True)
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(n)]
    (folder / name).write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_autotrain_command_trains(tiny_model_dir, tmp_path):
    project = tmp_path / "my-project"
    rc = main(["train", "--trainer", "sft", "--peft", "--model", str(tiny_model_dir("llama")),
               "--data-path", str(_sharegpt(tmp_path / "data")), "--use-sharegpt-mapping", "--project-name",
               str(project), "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "2",
               "--epochs", "1", "--max-steps", "2", "--no-sample"])
    assert rc == 0
    assert json.loads((project / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8
    assert len((project / "log_history.jsonl").read_text().splitlines()) == 2


def test_aliases_map_to_the_settings(capsys, tmp_path):
    cfg = _config(capsys, "--trainer", "sft", "--project-name", str(tmp_path / "p"), "--lora-r", "8",
                  "--lora-alpha", "32", "--peft", "--use-sharegpt-mapping", "--data-path", str(tmp_path / "d.csv"))
    assert cfg["method"] == "sft" and cfg["output_dir"] == str(tmp_path / "p")
    assert cfg["lora_r"] == 8 and cfg["lora_alpha"] == 32 and cfg["peft"] is True
    assert cfg["use_sharegpt_mapping"] is True and cfg["data"] == str(tmp_path / "d.csv")
    assert _config(capsys, "--trainer", "default")["method"] == "sft"  # autotrain's generic trainer


def test_yaml_keys_take_the_aliases_too(capsys, tmp_path):
    (tmp_path / "run.yaml").write_text(f"trainer: sft\nproject_name: {tmp_path / 'p'}\ndata-path: x.jsonl\n")
    cfg = _config(capsys, "--config", str(tmp_path / "run.yaml"))
    assert cfg["output_dir"] == str(tmp_path / "p") and cfg["data"] == "x.jsonl"


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv"])
def test_data_path_folder_means_its_train_file(name, capsys, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / name).write_text("text\nhello\n" if name.endswith(".csv") else '{"text": "hello"}\n')
    assert _config(capsys, "--data-path", str(folder))["data"] == str(folder / name)


def test_save_to_disk_folder_is_kept(capsys, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "ds"))
    assert _config(capsys, "--data-path", str(tmp_path / "ds"))["data"] == str(tmp_path / "ds")


@pytest.mark.parametrize("args, match", [
    (["--quantization", "int2"], "--quantization int2 is not understood"),
    (["--quantization", "int8", "--full-finetuning"], "cannot be combined with --full-finetuning"),
    (["--trainer", "ppo"], "--method ppo is not a training method"),
    (["--trainer", "dpo"], "--method dpo needs --data"),
    (["--trainer", "grpo", "--reward-funcs", "length"], "--method grpo needs --data"),
    (["--peft", "false"], "--full-finetuning"),
    (["--peft", "--full-finetuning"], "contradict"),
])
def test_alias_errors(args, match, capsys, tmp_path):
    rc = main(["train", "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
