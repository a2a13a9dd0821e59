"""fasttune train --method distillation: a student distilled from a teacher folder given by flag (its loading
options as JSON); without a teacher or data the command exits 2 naming the flags."""
import json

from tiny import hf_model, save_hf

from fasttune.cli import main

ARGS = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-completion-length", "4", "--lora-r", "4",
        "--no-sample"]


def test_distillation_from_the_command_line(tiny_model_dir, tmp_path, tiny_tokenizer, capsys):
    teacher = save_hf(hf_model("llama", seed=3, hidden_size=96), tmp_path / "teacher", tiny_tokenizer)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + {i} ="}) for i in range(4)))
    out = tmp_path / "out"
    rc = main(["train", "--method", "distillation", "--model", str(tiny_model_dir("llama")), "--data", str(data),
               "--teacher-model-name-or-path", str(teacher), "--teacher-model-init-kwargs", '{"dtype": "float32"}',
               "--beta", "0.5", "--output-dir", str(out), *ARGS])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2] and log[0]["loss"] > 0
    assert {"entropy", "completions/mean_length"} <= set(log[0])
    rc = main(["train", "--method", "distillation", "--model", str(tiny_model_dir("llama")), "--data", str(data),
               "--output-dir", str(tmp_path / "o2"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "--teacher-model-name-or-path" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
