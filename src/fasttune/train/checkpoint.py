"""Training checkpoints: trainable weights (safetensors), a PEFT adapter, optimizer, scheduler, grad scaler, RNG
states, data position and the run's identity (what must match to resume).

Each checkpoint is written into a temporary folder and renamed to `checkpoint-<step>` only when complete, so a
folder with that name is always whole. Nothing here unpickles: tensors load with `weights_only=True`, the rest is
JSON. Under FSDP every rank joins the gathers of a save (full tensors, the single-process format: it resumes on
any world size, sharded or not) and rank 0 writes.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from fasttune.atomic import atomic_folder
from fasttune.errors import ConfigError
from fasttune.train.fsdp import full_optimizer_state, gather_state, is_sharded, shard_like, shard_optimizer_state

STATE_NAME = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> tuple[dict, dict]:
    """(JSON part, tensor part) of the python, numpy, torch and cuda RNG states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    tensors = {"numpy_keys": torch.from_numpy(keys.astype(np.int64)), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return js, tensors


def set_rng_state(js: dict, tensors: dict):
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def trainable_state(model, keep: bool = True) -> dict[str, torch.Tensor]:
    return gather_state({n: p for n, p in model.named_parameters() if p.requires_grad}, keep)


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, scaler, state: dict,
                    total_limit: int | None = None, write: bool = True) -> Path:
    """`write=False` (FSDP ranks other than 0): only join the gathers."""
    from safetensors.torch import save_file

    from fasttune.peft.adapter_io import adapter_tensors, write_adapter

    final = output_dir / f"checkpoint-{step}"
    sharded, lora = is_sharded(model), model.lora_settings is not None
    trainable = trainable_state(model, keep=write)
    adapter = adapter_tensors(model) if sharded and lora else None
    optim = full_optimizer_state(optimizer, keep=write) if sharded else optimizer.state_dict()
    if not write:
        return final
    with atomic_folder(final, f"checkpoint {final.name}", replace=True) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if adapter is not None:
            write_adapter(model, tmp / "adapter", adapter)
        elif lora:
            model.save_pretrained(tmp / "adapter")  # PEFT format (PEFT's own save on the transformers fallback)
        rng_js, rng_tensors = rng_state()
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_tensors},
                   tmp / "training_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps({**state, "rng": rng_js}, indent=1))
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
        raise ConfigError(f"'{path}' is not a complete fasttune checkpoint (no {STATE_NAME}). Pass a "
                          f"checkpoint-N folder, or True for the latest one in output_dir.")
    return path


def _check_identity(path: Path, saved: dict, current: dict):
    if not saved:
        return
    if saved["architecture"] != current["architecture"]:
        raise ConfigError(f"Checkpoint {path} was trained on a different base model (architecture "
                          f"{saved['architecture']}, this one is {current['architecture']}). Resume with the "
                          f"base it was trained from ({saved.get('base')}).")
    if saved["lora"] != current["lora"]:
        diff = {k: (saved["lora"] or {}).get(k) for k in (current["lora"] or saved["lora"] or {})
                if (saved["lora"] or {}).get(k) != (current["lora"] or {}).get(k)}
        raise ConfigError(f"Checkpoint {path} was written with other LoRA settings: it has {diff}, the model "
                          f"now has {({k: (current['lora'] or {}).get(k) for k in diff})}. Resume with the same "
                          f"LoRA rank, alpha, targets and modules_to_save.")
    for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "seed"):
        if saved.get(k) != current.get(k):
            warnings.warn(f"Resuming {path} with {k}={current[k]} (it was trained with {saved.get(k)}): the run "
                          f"continues, but will not repeat the uninterrupted run exactly.")
    if saved.get("base") != current.get("base"):
        warnings.warn(f"Resuming {path}, trained from '{saved.get('base')}', on '{current.get('base')}' "
                      f"(same architecture).")


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, identity: dict) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / STATE_NAME).read_text())
    _check_identity(path, state.get("identity"), identity)
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
            p.copy_(shard_like(saved[n], p))  # FSDP: this rank's shard of the full tensor
    blob = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(shard_optimizer_state(blob["optimizer"], optimizer))
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(state["rng"], blob["rng"])
    return state
