"""SIGTERM mid-run: the CLI saves a checkpoint and exits 130; --resume finishes to the uninterrupted result."""
import json
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file


def _cli(args):
    return [sys.executable, "-m", "fasttune.cli", "train", "--no-sample", *args]


def _losses(out):
    return [(h["step"], h["loss"]) for h in map(json.loads, (out / "log_history.jsonl").read_text().splitlines())]


def test_sigterm_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"row {i} " + "xyz " * (i % 7 + 1)}) for i in range(24)))
    common = ["--model", str(tiny_model_dir("llama")), "--data", str(data), "--max-steps", "60",
              "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-3", "--batch-size", "2", "--grad-accum", "2",
              "--logging-steps", "1"]
    full = tmp_path / "full"
    assert subprocess.run(_cli(common + ["--output-dir", str(full)]), capture_output=True).returncode == 0

    part = tmp_path / "part"
    proc = subprocess.Popen(_cli(common + ["--output-dir", str(part)]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = part / "log_history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM received" in err and "--resume" in err
    ckpts = list(part.glob("checkpoint-*"))
    assert len(ckpts) == 1 and 5 <= int(ckpts[0].name.split("-")[1]) < 60

    resumed = subprocess.run(_cli(common + ["--output-dir", str(part), "--resume"]), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(part) == _losses(full)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
