"""User code named in settings (train/imports.py): import paths and file.py:name, and the errors that name the spec."""
import json

import pytest

from fasttune.errors import ConfigError
from fasttune.train.imports import import_callables, import_object, is_import_spec
from fasttune.train.rewards import resolve_reward_funcs


def test_import_paths_and_files(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def f(completions, **_):\n    return [1.0] * len(completions)\nX = 3\n")
    assert import_object("json.dumps", "f") is json.dumps
    f = import_object(f"{tmp_path / 'mine.py'}:f", "f")
    assert f(["a", "b"]) == [1.0, 1.0]
    assert import_object(f"{tmp_path / 'mine.py'}:f", "f") is f  # the file runs once
    monkeypatch.chdir(tmp_path)
    assert import_callables("mine.py:f, json.loads", "tools") == [f, json.loads]  # relative to the working directory
    assert resolve_reward_funcs(["exact_match", "mine.py:f"], 8)[1] is f  # TRL's CLI way to one's own reward
    assert is_import_spec("a.b") and is_import_spec("x.py:f") and not is_import_spec("exact_match")


@pytest.mark.parametrize("spec,message", [
    ("nowhere.py:f", "names the file .*nowhere.py, which does not exist"),
    ("no_such_module_xyz.f", "the module no_such_module_xyz cannot be imported"),
    ("json.no_such_name", "defines no 'no_such_name'"),
    ("mine.py:X", "'mine.py:X' is a int, not a function or class"),
    ("broken.py:f", "running .*broken.py failed \\(ZeroDivisionError"),
])
def test_errors_name_the_spec(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("X = 3\n")
    (tmp_path / "broken.py").write_text("1 / 0\n")
    with pytest.raises(ConfigError, match=f"tools: .*{message}"):
        import_callables([spec], "tools")
    with pytest.raises(ConfigError, match="is not an import path"):
        import_object("no dots here", "tools")


def test_environment_factory_specs(tmp_path, monkeypatch):
    from fasttune import GRPOConfig
    from fasttune.train.objectives.grpo_config import environment_factories

    monkeypatch.chdir(tmp_path)
    (tmp_path / "envs.py").write_text("class A:\n    def reset(self, **row):\n        pass\n\nclass B(A):\n    pass\n")
    one = environment_factories("envs.py:A")
    assert one.__name__ == "A"
    both = environment_factories("a=envs.py:A, b = envs.py:B")
    assert list(both) == ["a", "b"] and both["a"] is one and both["b"].__name__ == "B"
    for bad in ("=envs.py:A", "a=envs.py:A,a=envs.py:B"):
        with pytest.raises(ConfigError, match="name=package.module.Class pairs, each name once"):
            environment_factories(bad)
    with pytest.raises(ConfigError, match=r"environment_factory\['a'\]: .*defines no 'C'"):
        GRPOConfig(output_dir=str(tmp_path / "o"), environment_factory="a=envs.py:C")
