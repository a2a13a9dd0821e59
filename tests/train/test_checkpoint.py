"""Checkpoints and resume: the last step's checkpoint, extending a finished run, settings that must not change,
stale checkpoints in a reused folder, leftovers of a killed save, folder permissions and failed writes."""
import json
import os
import resource
import signal
import stat

import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError, FastTuneError


def _rows(n=12):
    return [{"text": f"sample {i} " + "abc " * (1 + i % 5)} for i in range(n)]


def _trainer(folder, out, **cfg):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    cfg = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, **cfg}
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=SFTConfig(output_dir=str(out), **cfg))


def _losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.log_history if "loss" in h]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_extend_a_finished_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path, capsys):
    folder = tiny_model_dir("llama")
    full = _trainer(folder, tmp_path / "full", max_steps=6, lr_scheduler_type="constant")
    full.train()
    first = _trainer(folder, tmp_path / "run", max_steps=3, save_steps=3, lr_scheduler_type="constant")
    first.train()
    assert (tmp_path / "run" / "checkpoint-3" / "trainer_state.json").exists()  # the last step is saved too
    more = _trainer(folder, tmp_path / "run", max_steps=6, lr_scheduler_type="constant")
    more.train(resume_from_checkpoint=True)
    assert "resuming from " + str(tmp_path / "run" / "checkpoint-3") + " at step 3 of 6." in capsys.readouterr().err
    assert _losses(more) == _losses(full)
    a, b = _trainable(full.model), _trainable(more.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_schedule_changes_are_refused_with_the_difference(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    _trainer(folder, out, max_steps=4, save_steps=2, learning_rate=1e-3).train()
    # A longer linear schedule would change the learning rate of the steps already taken.
    with pytest.raises(ConfigError, match=r"step 4 of a 4-step run \(linear schedule\); this run asks for 8 steps.*"
                                          r"step 4's would be 0\.0005 instead of 0\b"):
        _trainer(folder, out, max_steps=8, learning_rate=1e-3).train(resume_from_checkpoint=True)
    with pytest.raises(ConfigError, match=r"trained with learning_rate=0\.001 \(now 0\.002\), "
                                          r"gradient_accumulation_steps x processes=2 x 1 \(now 1 x 1\)\."):
        _trainer(folder, out, max_steps=4, learning_rate=2e-3, gradient_accumulation_steps=1).train(
            resume_from_checkpoint=True)
    with pytest.raises(ConfigError, match=r"lr_scheduler_type='linear' \(now 'cosine_with_min_lr'\), "
                                          r"lr_scheduler_kwargs=None \(now \{'min_lr_rate': 0\.1\}\)"):
        _trainer(folder, out, max_steps=4, learning_rate=1e-3, lr_scheduler_type="cosine_with_min_lr",
                 lr_scheduler_kwargs={"min_lr_rate": 0.1}).train(resume_from_checkpoint=True)
    # The same settings: the finished run resumes to nothing left to do.
    done = _trainer(folder, out, max_steps=4, learning_rate=1e-3)
    assert done.train(resume_from_checkpoint=True)["global_step"] == 4


def test_new_run_into_a_folder_with_checkpoints(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    _trainer(folder, out, max_steps=4, save_steps=1).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]
    with pytest.raises(ConfigError, match=r"already holds checkpoints of an earlier run \(checkpoint-1, checkpoint-2, "
                                          r"checkpoint-3, checkpoint-4\).*--resume.*--overwrite-output-dir"):
        _trainer(folder, out, max_steps=2, save_steps=1, save_total_limit=1).train()
    # overwrite_output_dir: the old run's checkpoints go first, so save_total_limit keeps this run's newest.
    _trainer(folder, out, max_steps=2, save_steps=1, save_total_limit=1, overwrite_output_dir=True).train()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_leftovers_are_removed_and_folders_get_normal_permissions(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    (out / ".checkpoint-2.tmp-1a2b3c4d").mkdir(parents=True)  # a save killed half-way
    (out / ".adapter.tmp-5e6f7a8b").mkdir()
    old = os.umask(0o022)
    try:
        t = _trainer(folder, out, max_steps=2, save_steps=2)
        t.train()
        t.model.save_pretrained(out / "adapter")
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-2", "log_history.jsonl"]
    for p in (out / "checkpoint-2", out / "checkpoint-2" / "adapter", out / "adapter"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p


def test_resume_with_other_vocabulary_names_the_added_tokens(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model.resize_token_embeddings(302)  # two tokens past the tiny model's 300 rows
    model = FastLanguageModel.get_peft_model(model, r=4)
    SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(),
               args=SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, save_steps=1)).train()
    with pytest.raises(ConfigError, match=r"vocabulary of 302 tokens; this model has 300\. The run added tokens.*"
                                          r"add the same tokens to this model and its tokenizer"):
        _trainer(folder, tmp_path / "run", max_steps=1).train(resume_from_checkpoint=True)


def test_a_failed_checkpoint_write_keeps_the_last_complete_one(tiny_model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    from fasttune.train import run_folder

    real = safetensors.torch.save_file

    def full_disk_on_second_save(tensors, path, *a, **k):  # what safetensors raises when the disk fills
        if ".checkpoint-4." in str(path):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_on_second_save)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"The disk is full: could not write checkpoint checkpoint-4 to .*another "
                                          r"output location\. Earlier checkpoints are intact\.$"):
        _trainer(tiny_model_dir("llama"), out, max_steps=6, save_steps=2).train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "log_history.jsonl"]
    assert run_folder.list_checkpoints(out) == [out / "checkpoint-2"]


def test_cli_write_failure_is_one_paragraph(tiny_model_dir, tmp_path, capsys):
    """A real failing write (a 20 kB file-size limit: the checkpoint's tensors do not fit): exit 2, one line, no
    traceback, no temporary folder left."""
    from fasttune.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows()))
    model, out = str(tiny_model_dir("llama")), tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code = main(["train", "--model", model, "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                     "--save-steps", "1", "--no-sample", "--lora-r", "64"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert code == 2
    assert f"fasttune: error: Could not write checkpoint checkpoint-1 to '{out / 'checkpoint-1'}': File too large." \
        in err.splitlines()  # on a line of its own: the progress bar was closed first
    assert not out.exists() or not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["trainer_state.json", "trainable.safetensors", "training_state.pt"])
def test_damaged_checkpoint_is_named(tiny_model_dir, tmp_path, damage):
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    _trainer(folder, out, max_steps=2, save_steps=1).train()
    target = out / "checkpoint-2" / damage
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # a copy cut short
    with pytest.raises(FastTuneError, match=rf"{target}.*resume from an earlier checkpoint-N in {out}"):
        _trainer(folder, out, max_steps=2).train(resume_from_checkpoint=True)
