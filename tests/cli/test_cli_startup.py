"""fasttune train checks its inputs before the model loads, and the demo run samples a prompt it never trains on."""
import json
import re

import pytest
from chat_rows import write_chat_rows

from fasttune.cli import main


_rows = write_chat_rows


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if `fasttune train` reaches the model loader."""
    from fasttune import FastLanguageModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", refuse)


def _file(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# name: (extra arguments given tmp_path, what the error says)
BAD_INPUTS = {
    "missing data": (lambda t: ["--data", str(t / "missing.jsonl")], r"Dataset file not found: .*missing\.jsonl"),
    "broken json": (lambda t: ["--data", str(_file(t / "bad.jsonl", '{"a": 1}\n{"a": '))], r"bad\.jsonl"),
    "unknown layout": (lambda t: ["--data", str(_file(t / "cols.jsonl", '{"foo": "x"}\n'))], r"cols\.jsonl.*'foo'"),
    "output is a file": (lambda t: ["--output-dir", str(_file(t / "file", "x"))], r"--output-dir '.*file' is a file"),
    "output under a file": (lambda t: ["--output-dir", str(_file(t / "f2", "x") / "sub" / "out")],
                            r"cannot be created: '.*f2' is a file"),
    "stale checkpoints": (lambda t: ["--output-dir", str(_file(t / "old" / "checkpoint-8" / "trainer_state.json",
                                                             "{}").parent.parent)],
                          r"'.*old' already holds checkpoints of an earlier run \(checkpoint-8\).*--resume"),
    "resume without checkpoint": (lambda t: ["--resume"], r"holds no complete checkpoint"),
    "dtype": (lambda t: ["--dtype", "float8"], r"dtype='float8' is not understood"),
    "max steps 0": (lambda t: ["--max-steps", "0"],
                    r"max_steps=0 is invalid: give the number of optimizer steps \(>= 1\), or -1"),
    "max steps below -1": (lambda t: ["--max-steps", "-2"], r"max_steps=-2 is invalid"),
    "checkpointing": (lambda t: ["--gradient-checkpointing", "sometimes"],
                      r"--gradient-checkpointing sometimes is not understood"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_inputs_fail_before_the_model_loads(case, tmp_path, capsys, no_model_load):
    """Each error is reported although --model names no model at all: the loader was never reached."""
    make_args, match = BAD_INPUTS[case]
    args = ["--data", str(_rows(tmp_path / "d.jsonl")), "--output-dir", str(tmp_path / "out"), *make_args(tmp_path)]
    rc = main(["train", "--model", str(tmp_path / "no-such-model"), *args])  # later flags win
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(match, err, re.S), err
    assert "no-such-model" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, match", [
    (["--data", "missing.jsonl"], "Dataset file not found"),
    (["--output-dir", "{old}"], "already holds checkpoints"),
    (["--resume", "--output-dir", "{empty}"], "holds no complete checkpoint"),
])
def test_path_errors_come_before_the_slow_imports(tmp_path, args, match):
    """A mistyped path or folder is refused before torch and datasets are imported (the seconds a command spends
    before its first useful message)."""
    import subprocess
    import sys

    (tmp_path / "old" / "checkpoint-2").mkdir(parents=True)
    args = [a.format(old=tmp_path / "old", empty=tmp_path / "empty") for a in args]
    code = ("import sys; from fasttune.cli import main; rc = main(['train', *sys.argv[1:]]); "
            "print(rc, 'torch' in sys.modules, 'datasets' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert match in proc.stderr
    assert proc.stdout.split() == ["2", "False", "False"]


def test_model_error_comes_after_good_inputs(tmp_path, capsys):
    rc = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(_rows(tmp_path / "d.jsonl")),
               "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "no-such-model' does not exist" in capsys.readouterr().err


def test_demo_run_samples_a_held_out_prompt(tiny_model_dir, tmp_path, capsys):
    from fasttune.data import demo_dataset_path, demo_heldout_path, demo_sample_prompt

    trained = {json.loads(line)["messages"][0]["content"] for line in demo_dataset_path().read_text().splitlines()}
    held_out = [json.loads(line)["messages"][0]["content"] for line in demo_heldout_path().read_text().splitlines()]
    assert held_out and not set(held_out) & trained
    prompt = demo_sample_prompt()
    assert prompt == held_out[0]
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--output-dir", str(tmp_path / "out"),
               "--max-steps", "1", "--lora-r", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"Sample before training\n  prompt: {prompt}\n" in out and f"Sample after training\n  prompt: {prompt}\n" in out


def test_run_with_data_samples_its_first_prompt(tiny_model_dir, tmp_path, capsys):
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(_rows(tmp_path / "d.jsonl")),
               "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--lora-r", "4"])
    assert rc == 0 and "Sample before training\n  prompt: q0\n" in capsys.readouterr().out
