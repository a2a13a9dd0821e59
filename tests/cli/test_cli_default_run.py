"""`fasttune train` with no model or data arguments: embedded SmolLM2 on the bundled demo set."""
import json

import pytest

from fasttune.cli import main

pytestmark = pytest.mark.slow


def test_default_run_learns_the_demo_style(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--output-dir", str(out), "--max-steps", "12"]) == 0
    losses = [json.loads(x)["loss"] for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]
    printed = capsys.readouterr().out
    assert "Sample before training" in printed and "Sample after training" in printed
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "loss.png").exists()
