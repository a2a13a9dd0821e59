"""Resume through `fasttune train --resume` (#17): a finished run extended to more steps equals the uninterrupted
run and says which checkpoint it resumes; a longer linear schedule resumed from a finished run's last checkpoint
(the learning-rate jump the issue saw) is refused naming the difference, leaving the folder as it was."""
import json

from chat_rows import write_chat_rows

from fasttune.cli import main


def _data(tmp_path):
    return write_chat_rows(tmp_path / "d.jsonl")


def _args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--no-sample",
            "--lora-r", "4", "--batch-size", "2", "--lr", "1e-2", "--logging-steps", "1", *extra]


def _log(out):
    return [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]


def test_extend_a_finished_run_with_resume_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    model, data = tiny_model_dir("llama"), _data(tmp_path)
    constant = ["--lr-scheduler-type", "constant"]
    assert main(_args(model, data, tmp_path / "full", "--max-steps", "6", *constant)) == 0
    assert main(_args(model, data, tmp_path / "run", "--max-steps", "3", "--save-steps", "3", *constant)) == 0
    assert (tmp_path / "run" / "checkpoint-3" / "trainer_state.json").exists()  # the last step's checkpoint
    capsys.readouterr()
    assert main(_args(model, data, tmp_path / "run", "--max-steps", "6", "--resume", *constant)) == 0
    out = capsys.readouterr()
    assert f"fasttune: resuming from {tmp_path / 'run' / 'checkpoint-3'} at step 3 of 6." in out.err.splitlines()
    full, extended = _log(tmp_path / "full"), _log(tmp_path / "run")
    assert [h["step"] for h in extended] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in extended] == [h["loss"] for h in full]
    assert [h["learning_rate"] for h in extended] == [h["learning_rate"] for h in full]


def test_longer_linear_schedule_on_resume_is_refused_naming_the_change(tiny_model_dir, tmp_path, capsys):
    model, data, out = tiny_model_dir("llama"), _data(tmp_path), tmp_path / "run"
    assert main(_args(model, data, out, "--max-steps", "12", "--save-steps", "5")) == 0
    # every save_steps multiple and the last step, as transformers saves them
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12", "checkpoint-5"]
    before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(_args(model, data, out, "--max-steps", "20", "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("fasttune: error: ")]
    assert f"{out / 'checkpoint-12'}" in line
    assert "step 12 of a 12-step run (linear schedule); this run asks for 20 steps" in line
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
