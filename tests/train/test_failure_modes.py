"""Failure paths inside training: CUDA OOM advice, disk full while checkpointing, incomplete checkpoints."""
import errno

import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError, FastTuneError
from fasttune.train.run_folder import STATE_NAME, list_checkpoints


def _rows():
    return [{"text": f"sample {i} " + "abc " * (1 + i % 5)} for i in range(8)]


def _trainer(folder, out, cls=SFTTrainer, **cfg):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4)
    return cls(model=model, tokenizer=tok, train_dataset=_rows(),
               args=SFTConfig(output_dir=str(out), per_device_train_batch_size=2, **cfg))


class _OOMTrainer(SFTTrainer):
    def micro_batch_loss(self, batch, num_items):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_cuda_oom_names_batch_seq_and_checkpointing(tiny_model_dir, tmp_path):
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", cls=_OOMTrainer, max_steps=2, max_seq_length=64)
    with pytest.raises(FastTuneError) as e:
        t.train()
    msg = str(e.value)
    assert "batch size 2" in msg and "gradient checkpointing False" in msg and "max_seq_length (now 64" in msg
    assert "turn on gradient checkpointing" in msg


def test_disk_full_while_checkpointing_leaves_no_partial_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import fasttune.train.checkpoint as ck

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=3, save_steps=2)
    with pytest.raises(ConfigError, match="disk is full"):
        t.train()
    assert not [p for p in (tmp_path / "o").iterdir() if "checkpoint" in p.name]


def test_incomplete_checkpoint_is_ignored(tiny_model_dir, tmp_path):
    t = _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=5, save_steps=2)
    t.train()
    (tmp_path / "o" / "checkpoint-4" / STATE_NAME).unlink()  # as if killed while writing
    assert [p.name for p in list_checkpoints(tmp_path / "o")] == ["checkpoint-2", "checkpoint-5"]


def test_resume_on_other_base_is_refused(tiny_model_dir, tmp_path):
    _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=3, save_steps=2).train()
    other = _trainer(tiny_model_dir("llama", num_hidden_layers=3), tmp_path / "o", max_steps=3)
    with pytest.raises(ConfigError, match="different base model"):
        other.train(resume_from_checkpoint=True)


def test_checkpoint_loads_without_pickle(tiny_model_dir, tmp_path):
    _trainer(tiny_model_dir("llama"), tmp_path / "o", max_steps=3, save_steps=2).train()
    blob = torch.load(tmp_path / "o" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(blob)
