"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position.

Each checkpoint is written into a temporary folder and renamed to `checkpoint-<step>` only when complete, so a
folder with that name is always whole; `trainer_state.json` is written last inside it.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fasttune.errors import ConfigError

STATE_NAME = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, state: dict, tokenizer=None,
                    total_limit: int | None = None) -> Path:
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=output_dir))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if getattr(model, "lora_settings", None) is not None:
            from fasttune.peft.adapter_io import save_adapter

            save_adapter(model, tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "training_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"Could not write checkpoint {final}: {e}. Check free disk space and permissions of "
                          f"'{output_dir}'.") from None
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts only once its trainer_state.json exists)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_NAME).exists()]


def resolve_resume(resume, output_dir: Path) -> Path | None:
    if resume in (None, False):
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume_from_checkpoint=True but '{output_dir}' holds no complete checkpoint "
                              f"(checkpoint-N with {STATE_NAME}). Train with save_steps > 0 first.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).exists():
        raise ConfigError(f"'{path}' is not a complete fasttune checkpoint (no {STATE_NAME}).")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise ConfigError(f"Checkpoint {path} was written for a different trainable set ({len(saved)} tensors, this "
                          f"model trains {len(params)}). Resume with the same model, LoRA rank, targets and "
                          f"modules_to_save.")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise ConfigError(f"Checkpoint {path}: '{n}' has shape {tuple(saved[n].shape)}, the model has "
                                  f"{tuple(p.shape)}. Resume with the same LoRA rank and base model.")
            p.copy_(saved[n])
    blob = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / STATE_NAME).read_text())
