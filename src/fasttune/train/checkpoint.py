"""Training checkpoints: trainable weights (safetensors), a PEFT adapter, optimizer, scheduler, grad scaler, RNG
states, data position, the run's identity (what must match to resume) and the objective's own state (its JSON, and
its tensors in objective.safetensors: TR-DPO's synced reference).

Each checkpoint is written into a temporary folder and renamed to `checkpoint-<step>` only when complete, so a
folder with that name is always whole. Nothing here unpickles: tensors load with `weights_only=True`, the rest is
JSON. Under FSDP every rank joins the gathers of a save (full tensors, the single-process format: it resumes on
any world size, sharded or not) and rank 0 writes.
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from fasttune.atomic import atomic_folder
from fasttune.errors import ConfigError
from fasttune.wording import plural
from fasttune.train.optim import lr_lambda, warmup_count
from fasttune.train.run_folder import STATE_NAME, list_checkpoints
from fasttune.train.fsdp import full_optimizer_state, gather_state, is_sharded, shard_like, shard_optimizer_state

OBJECTIVE_TENSORS = "objective.safetensors"  # the objective's own tensors (Trainer.objective_tensors)
SCHEDULE_KEYS = ("learning_rate", "embedding_learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                 "warmup_steps", "warmup_ratio", "weight_decay", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed")
_PER_STEP = ("gradient_accumulation_steps", "world_size", "micro_batches_per_step", "total_steps")


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
    """Restore the RNG states saved by `rng_state`; the CUDA states only where CUDA is available."""
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def trainable_state(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of the parameters with requires_grad. Under FSDP every rank must call it (the shards
    are gathered); keep=False returns {} after joining the gathers."""
    return gather_state({n: p for n, p in model.named_parameters() if p.requires_grad}, keep)


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, scaler, state: dict,
                    total_limit: int | None = None, write: bool = True, tensors: dict | None = None) -> Path:
    """`write=False` (FSDP ranks other than 0): only join the gathers. `tensors`: the objective's
    ({name: tensor}, Trainer.objective_tensors), written to OBJECTIVE_TENSORS when there are any."""
    from safetensors.torch import save_file

    from fasttune.peft.adapter_io import adapter_tensors, write_adapter

    final = output_dir / f"checkpoint-{step}"
    sharded, lora = is_sharded(model), model.lora_settings is not None
    trainable = trainable_state(model, keep=write)
    adapter = adapter_tensors(model) if sharded and lora else None
    optim = full_optimizer_state(optimizer, keep=write) if sharded else optimizer.state_dict()
    extra = gather_state(tensors, keep=write) if tensors else {}
    if not write:
        return final
    earlier = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p != final]
    with atomic_folder(final, f"checkpoint {final.name}", replace=True,
                       kept="Earlier checkpoints are intact." if earlier else "") as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if extra:
            save_file(extra, str(tmp / OBJECTIVE_TENSORS))
        if adapter is not None:
            write_adapter(model, tmp / "adapter", adapter)
        elif lora:
            model.save_pretrained(tmp / "adapter")  # PEFT format (PEFT's own save on the transformers fallback)
        rng_js, rng_tensors = rng_state()
        with open(tmp / "training_state.pt", "wb") as f:  # a file object: a failed write keeps its OSError
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_tensors}, f)
        (tmp / STATE_NAME).write_text(json.dumps({**state, "rng": rng_js}, indent=1))
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def schedule_settings(args, total_steps: int, world_size: int) -> dict:
    """The settings a resumed run must share with the checkpoint's run: they shape the optimizer state, the
    learning-rate schedule or the order of the data (and the total, checked by `check_schedule`)."""
    # The micro-batches per optimizer step (accumulation x processes) fix the data order; how they split between
    # accumulation and processes does not (an FSDP checkpoint resumes on another world size).
    return {**{k: getattr(args, k) for k in SCHEDULE_KEYS},
            "micro_batches_per_step": args.gradient_accumulation_steps * world_size, "world_size": world_size,
            "total_steps": total_steps}


def check_schedule(path: Path, state: dict, current: dict, learning_rate: float):
    """Refuse a resume whose schedule-defining settings differ from the checkpoint's, naming each difference. A
    different total number of steps is accepted when the learning rate of every step already taken is the same
    under the new total (constant schedules, or a warmup that is unchanged): the run then equals an uninterrupted
    run with the new total. Older checkpoints without a saved schedule are compared on their saved config."""
    saved = state.get("schedule") or {k: v for k, v in (state.get("config") or {}).items() if k in SCHEDULE_KEYS}
    if "micro_batches_per_step" not in saved and "gradient_accumulation_steps" in saved:  # saved config only
        saved = {**saved, "micro_batches_per_step": saved["gradient_accumulation_steps"] * current["world_size"]}
    diff = [f"{k}={saved[k]!r} (now {current[k]!r})" for k in current
            if k in saved and k not in _PER_STEP and saved[k] != current[k]]
    if saved["micro_batches_per_step"] != current["micro_batches_per_step"]:
        was = (f"{saved['gradient_accumulation_steps']} x {saved['world_size']}" if "world_size" in saved
               else str(saved["micro_batches_per_step"]))
        diff.append(f"gradient_accumulation_steps x processes={was} (now {current['gradient_accumulation_steps']} "
                    f"x {current['world_size']})")
    if diff:
        raise ConfigError(f"Checkpoint {path} was trained with " + ", ".join(diff) + ". These settings shape the "
                          f"optimizer state, the learning-rate schedule or the order of the data, so the resumed run "
                          f"would not continue that run. Resume with the checkpoint's values, or start a new run "
                          f"(another output_dir, or overwrite_output_dir=True).")
    old_total, new_total, step = saved.get("total_steps"), current["total_steps"], state["step"]
    if old_total is None or old_total == new_total:
        return
    kind, warmup, ratio = current["lr_scheduler_type"], saved["warmup_steps"], saved["warmup_ratio"]
    kwargs = current.get("lr_scheduler_kwargs")
    old_f, new_f = (lr_lambda(kind, warmup_count(warmup, ratio, t), t, kwargs, learning_rate)
                    for t in (old_total, new_total))
    if all(abs(old_f(s) - new_f(s)) <= 1e-12 for s in range(step + 1)):
        return
    raise ConfigError(
        f"Checkpoint {path} is step {step} of a {old_total}-step run ({current['lr_scheduler_type']} schedule); this "
        f"run asks for {plural(new_total, 'step')}, which changes the learning rate of the steps already taken (step {step}'s "
        f"would be {learning_rate * new_f(step):.3g} instead of {learning_rate * old_f(step):.3g}), so the result "
        f"would match neither run. Resume with the old total (max_steps={old_total}), or, to train longer, use "
        f"lr_scheduler_type='constant' (or 'constant_with_warmup') from the start, or start a new run from the "
        f"saved adapter.")


def _check_identity(path: Path, saved: dict, current: dict):
    if not saved:
        return
    vocab_only = [a for i, a in enumerate(saved["architecture"]) if i != 1] == \
        [a for i, a in enumerate(current["architecture"]) if i != 1]
    if saved["architecture"] != current["architecture"] and vocab_only:
        raise ConfigError(f"Checkpoint {path} was trained with a vocabulary of {saved['architecture'][1]} tokens; "
                          f"this model has {current['architecture'][1]}. The run added tokens (add_new_tokens or "
                          f"resize_token_embeddings) before training: add the same tokens to this model and its "
                          f"tokenizer, in the same order, before resuming.")
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
    if saved.get("base") != current.get("base"):
        warnings.warn(f"Resuming {path}, trained from '{saved.get('base')}', on '{current.get('base')}' "
                      f"(same architecture).")


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, identity: dict, check=None) -> dict:
    """Load a checkpoint into the model, optimizer, scheduler and scaler; returns its trainer state. `identity`
    (Trainer.run_identity) must match the saved one; `check(state)` may refuse the resume before anything is
    loaded. Raises ConfigError."""
    from fasttune.file_readers import load_safetensors, read_json, torch_load

    fix = (f"The checkpoint is damaged (a copy or disk failure): resume from an earlier checkpoint-N in "
           f"{path.parent}, or start a new run.")
    state = read_json(path / STATE_NAME, ConfigError, fix=fix)
    _check_identity(path, state.get("identity"), identity)
    if check is not None:
        check(state)
    saved = load_safetensors(path / "trainable.safetensors", fix=fix)
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
    blob = torch_load(path / "training_state.pt", fix=fix)
    optimizer.load_state_dict(shard_optimizer_state(blob["optimizer"], optimizer))
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(state["rng"], blob["rng"])
    extra = path / OBJECTIVE_TENSORS
    state["objective_tensors"] = load_safetensors(extra, fix=fix) if extra.exists() else {}
    return state
