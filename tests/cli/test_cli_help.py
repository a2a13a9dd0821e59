"""`fasttune train --help` states the defaults the command uses: the ones --print-config shows, with and without
--data (the demo run's own settings)."""
import ast
import re

import pytest
import yaml

from fasttune.cli import main

DEFAULT = re.compile(r"\(default ([^;]*?)(?:; (.*) for the demo run without --data)?\)$")


def _help_defaults(capsys, *argv) -> dict:
    """{dest: (default, demo default or None)} of every flag whose help states a literal default."""
    with pytest.raises(SystemExit) as stop:
        main(["train", *argv, "--help"])
    assert stop.value.code == 0
    entries, current = [], None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = [line.strip()]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    found = {}
    for entry in entries:
        text = " ".join(entry)
        flag = text.split()[0].rstrip(",")
        match = DEFAULT.search(text)
        if not flag.startswith("--") or match is None:
            continue
        demo = ast.literal_eval(match.group(2)) if match.group(2) else None
        found[flag[2:].replace("-", "_")] = (ast.literal_eval(match.group(1)), demo)
    return found


def _printed(capsys, *argv) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_help_defaults_equal_print_config(method, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    shown = _help_defaults(capsys, "--method", method)
    assert {"output_dir", "learning_rate", "max_steps", "lora_r", "quantization"} <= set(shown)
    with_data = _printed(capsys, "--method", method, "--data", str(data))
    demo = _printed(capsys) if method == "sft" else None
    for name, (default, demo_default) in shown.items():
        if name == "method":  # given above
            continue
        assert with_data[name] == default, name
        if demo is not None:
            assert demo[name] == (default if demo_default is None else demo_default), name
    assert shown["output_dir"] == ("fasttune_output", None)
    if method == "sft":
        assert shown["learning_rate"] == (2e-4, 1e-3)


def test_help_names_every_method(capsys):
    """The --method help lists every training method the command runs (commands/_methods.py's METHODS)."""
    from fasttune.commands._methods import METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = re.search(r"training objective: ([a-z0-9_| ]+)", text).group(1)
    assert {m.strip() for m in listed.split("|")} == set(METHODS)
