"""fasttune train --method grpo: reward functions by name from flags and YAML; bad specs and rows exit 2."""
import json

from fasttune.cli import main


def _data(tmp_path, rows=None):
    rows = rows or [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


ARGS = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--num-generations", "2",
        "--max-completion-length", "3", "--lora-r", "4", "--no-sample"]


def test_grpo_trains_with_named_rewards(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--method", "grpo", "--reward-funcs", "exact_match,length", "--model",
               str(tiny_model_dir("llama")), "--data", _data(tmp_path), "--output-dir", str(out), *ARGS])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2]
    assert {"reward", "rewards/exact_match/mean", "rewards/length/mean", "completions/mean_length"} <= set(log[0])


def test_grpo_yaml_reward_list(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text('method: grpo\nreward_funcs: ["exact_match", "regex:^\\\\d+, ?$"]\n'
                                       "reward_weights: [1.0, 0.5]\nbeta: 0.05\n")
    out = tmp_path / "out"
    rc = main(["train", "--config", str(tmp_path / "run.yaml"), "--model", str(tiny_model_dir("llama")), "--data",
               _data(tmp_path), "--output-dir", str(out), *ARGS])
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert "rewards/regex:^\\d+, ?$/mean" in log[0] and "kl" in log[0]


def test_grpo_bad_reward_spec_and_row(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    rc = main(["train", "--method", "grpo", "--reward-funcs", "exact_match,regex:(", "--model", model, "--data",
               _data(tmp_path), "--output-dir", str(tmp_path / "o1"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "reward_funcs" in err and "not a valid regular expression" in err and "Traceback" not in err
    rc = main(["train", "--method", "grpo", "--reward-funcs", "exact_match", "--model", model, "--data",
               _data(tmp_path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}]),
               "--output-dir", str(tmp_path / "o2"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "Row 1 of prompts.jsonl" in err and "'answer'" in err
    assert not (tmp_path / "o2").exists()


def test_grpo_without_rewards_names_the_flag(tiny_model_dir, tmp_path, capsys):
    """A config field the API error names (GRPOConfig.reward_funcs) is named by its flag first on the command line;
    nothing is left behind."""
    rc = main(["train", "--method", "grpo", "--model", str(tiny_model_dir("llama")), "--data", _data(tmp_path),
               "--output-dir", str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "set --reward-funcs (GRPOConfig.reward_funcs) to" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


AGENT_PY = '''
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


class Counter:
    def reset(self, **row):
        self.n = 0
        return " (count)"

    def bump(self) -> int:
        """Count one more."""
        self.n += 1
        return self.n

    def get_reward(self):
        return float(self.n)


def length(completions, **_):
    return [float(len(c)) for c in completions]
'''


def test_grpo_tools_and_environment_from_files(tmp_path, capsys):
    """--tools / --environment-factory / --reward-funcs take the user's own code as file.py:name (or an import
    path): a run with them trains and logs the tool and environment metrics; a template without tools exits 2."""
    from grpo_tools_oracle import LONG, tool_tokenizer
    from tiny import hf_model, save_hf

    from fasttune.cli import main

    model = save_hf(hf_model("llama", **LONG), tmp_path / "model", tool_tokenizer())
    (tmp_path / "agent.py").write_text(AGENT_PY)
    agent = str(tmp_path / "agent.py")
    data = _data(tmp_path, [{"prompt": [{"role": "user", "content": f"{i} times 2?"}]} for i in range(2)])
    out = tmp_path / "out"
    flags = ["--method", "grpo", "--model", str(model), "--data", data, *ARGS, "--max-tool-calling-iterations", "1"]
    rc = main(["train", *flags, "--reward-funcs", f"{agent}:length", "--tools", f"{agent}:multiply",
               "--environment-factory", f"{agent}:Counter", "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert {"tools/call_frequency", "rewards/Counter/mean", "rewards/length/mean"} <= set(log[0])
    rc = main(["train", *flags, "--reward-funcs", "length", "--tools", f"{agent}:nothing",
               "--output-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "defines no 'nothing'" in err and "Traceback" not in err and not (tmp_path / "o2").exists()
