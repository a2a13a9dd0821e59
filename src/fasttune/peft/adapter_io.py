"""PEFT-format adapters: adapter_config.json + adapter_model.safetensors with PEFT's key names.

Keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` for LoRA layers (DoRA layers also
`<module>.lora_magnitude_vector`) and `base_model.model.<module>.weight` for modules_to_save, exactly what
`peft.PeftModel.from_pretrained` reads.
LoRA on stacked MoE experts (target_parameters) is keyed as PEFT's nested ParamWrappers are: the wrapper of the
last adapted parameter of `mlp.experts` is outermost, so with both adapted gate_up_proj's tensors are
`<layer>.mlp.experts.base_layer.lora_A.weight` and down_proj's `<layer>.mlp.experts.lora_A.weight`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from fasttune.atomic import atomic_folder
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.file_readers import load_safetensors, read_json
from fasttune.peft.lora import (CLASSIFIER_HEADS, LoraSettings, apply_lora, expert_lora_layers, lora_layers,
                               matches_parameter)
from fasttune.peft.per_expert_adapter import has_per_expert_keys, stack_per_expert_adapter
from fasttune.sharding import gather_state, writes_here

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
HEAD_NAME = "classifier_head.json"  # fasttune's: a classifier adapter's num_labels, id2label, label2id, problem_type
ADAPTER_FIX = ("Save the adapter again (model.save_pretrained, or fasttune train, which writes OUTPUT_DIR/adapter), "
               "or copy it again if a copy or download stopped part-way.")


def checkpoint_names(model):
    """Our module name -> transformers' checkpoint name (the same, except for vision-language models and the families
    CausalLM.checkpoint_name renames)."""
    return getattr(model, "checkpoint_name", None) or (lambda name: name)


def expert_adapter_keys(model) -> dict[str, str]:
    """Stacked expert parameter name -> its PEFT key stem (without `.lora_A.weight`), e.g.
    "model.layers.1.mlp.experts.gate_up_proj" -> "base_model.model.model.layers.1.mlp.experts.base_layer".
    PEFT wraps a module's targeted parameters in their registration order, each wrapper around the previous one,
    so the i-th of k adapted parameters sits under k - 1 - i `base_layer` levels."""
    hf_name = checkpoint_names(model)
    by_module: dict[str, list[str]] = {}
    for name, _ in expert_lora_layers(model):
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    out = {}
    for module, names in by_module.items():
        for i, name in enumerate(names):
            out[name] = PREFIX + hf_name(module) + ".base_layer" * (len(names) - 1 - i)
    return out


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """PEFT key -> the model's own trainable adapter tensor (LoRA A/B of layers and expert weights, modules to
    save); see the module docstring for the keys."""
    out = {}
    hf_name = checkpoint_names(model)
    for name, layer in lora_layers(model):
        out[f"{PREFIX}{hf_name(name)}.lora_A.weight"] = layer.lora_A
        out[f"{PREFIX}{hf_name(name)}.lora_B.weight"] = layer.lora_B
        if hasattr(layer, "lora_magnitude_vector"):  # DoRA: PEFT's key has no `.weight`
            out[f"{PREFIX}{hf_name(name)}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    stems = expert_adapter_keys(model)
    for name, adapter in expert_lora_layers(model):
        out[f"{stems[name]}.lora_A.weight"] = adapter.lora_A
        out[f"{stems[name]}.lora_B.weight"] = adapter.lora_B
    for m in model.lora_settings.modules_to_save:
        full = "model.embed_tokens" if m == "embed_tokens" else m  # lm_head, or a classifier's score
        out[f"{PREFIX}{hf_name(full)}.weight"] = model.get_submodule(full).weight
    return out


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors (views of the model's own; see the module docstring)."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def peft_config_dict(settings: LoraSettings, base_name_or_path: str | None, target_names: list[str],
                     task_type: str = "CAUSAL_LM") -> dict:
    """The adapter_config.json PEFT's LoraConfig writes for these settings (PEFT's field names; use_dora as set,
    inference_mode true). target_modules is the sorted set of the wrapped layers' last name parts (routers, which
    PEFT adapts as a parameter, excluded); target_parameters, rank_pattern and alpha_pattern are the settings'
    (PEFT's keys for LoRA on MoE experts); `base_name_or_path` is written as base_model_name_or_path. task_type
    "SEQ_CLS" (a sequence classifier) lists the head as PEFT's SEQ_CLS task does: modules_to_save ends in
    "classifier", "score"."""
    modules = list(settings.modules_to_save)
    if task_type == "SEQ_CLS":
        modules = [m for m in modules if m not in CLASSIFIER_HEADS] + list(CLASSIFIER_HEADS)
    routers = {n for n in target_names if n.endswith(".mlp.gate")
               and matches_parameter(f"{n}.weight", settings.target_parameters)}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name_or_path,
        "r": settings.r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in target_names if n not in routers}),
        "target_parameters": list(settings.target_parameters) or None,
        "modules_to_save": modules or None,
        "bias": settings.bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": settings.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(settings.rank_pattern),
        "alpha_pattern": dict(settings.alpha_pattern),
        "revision": None,
    }


def task_type(model) -> str:
    """PEFT's task_type for this model's adapters: "SEQ_CLS" for a sequence classifier, else "CAUSAL_LM"."""
    return "SEQ_CLS" if getattr(model, "is_sequence_classifier", False) else "CAUSAL_LM"


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter as full CPU tensors. FSDP-sharded weights are gathered: a collective, all ranks call it."""
    return gather_state(adapter_state_dict(model), keep=True)


def save_adapter(model, folder: str | Path) -> Path:
    """Write the adapter atomically: into a temporary sibling folder, renamed into place when complete. For an
    FSDP-sharded model every rank must call it (the weights are gathered); only rank 0 writes."""
    if model.lora_settings is None:
        raise ConfigError("This model has no LoRA adapter to save; call FastLanguageModel.get_peft_model first "
                          "(or use save_pretrained_merged for a full checkpoint).")
    tensors = adapter_tensors(model)
    if writes_here(model):
        write_adapter(model, folder, tensors)
    return Path(folder)


def write_adapter(model, folder: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """adapter_config.json + adapter_model.safetensors from `tensors` (see adapter_tensors), atomically."""
    from safetensors.torch import save_file

    from fasttune.defaults import portable_base

    folder = Path(folder)
    base, marker = portable_base(model.name_or_path)  # the embedded model by a name that holds on other machines
    with atomic_folder(folder, "the adapter") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **marker})
        cfg = peft_config_dict(model.lora_settings, base, [n for n, _ in lora_layers(model)], task_type(model))
        if getattr(model, "family", None) is not None:
            cfg["target_modules"] = tower_safe_targets(model, cfg["target_modules"])
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        if task_type(model) == "SEQ_CLS":  # the class names, which PEFT's files do not keep
            c = model.config
            head = {"num_labels": c.num_labels, "id2label": {str(k): v for k, v in c.id2label.items()},
                    "label2id": c.label2id, "problem_type": c.problem_type}
            (tmp / HEAD_NAME).write_text(json.dumps(head, indent=2))
    return folder


def tower_safe_targets(model, suffixes: list[str]):
    """adapter_config's target_modules for a vision-language model: its layer-group regex as it is; else the
    wrapped layers' name suffixes, unless PEFT's suffix rule would also take tower / embedder modules of transformers'
    model that were not adapted (Gemma 4's Gemma4ClippableLinear wrappers named q_proj, which LoRA passes over as
    they are no linear layers, and PEFT refuses to load). Then a regex (PEFT matches a string whole): the suffixes
    inside the language model, or'd with the adapted tower layers' own names."""
    import re

    if isinstance(model.lora_settings.target_modules, str):
        return model.lora_settings.target_modules
    names = [model.checkpoint_name(n) for n, _ in model.named_modules()]
    adapted = {model.checkpoint_name(n) for n, _ in lora_layers(model)}
    language = model.language_prefix
    extra = [n for n in names if not n.startswith(language) and n not in adapted
             and any(n == t or n.endswith("." + t) for t in suffixes)]
    if not extra:
        return suffixes
    alternatives = [rf"{re.escape(language)}(.*\.)?({'|'.join(map(re.escape, suffixes))})"]
    alternatives += [re.escape(n) for n in sorted(adapted) if not n.startswith(language)]
    return "|".join(f"({a})" for a in alternatives)


TRAINABLE_NAME = "model.safetensors"


def write_trainable_state(model, folder: str | Path) -> Path:
    """`folder/model.safetensors` with the trainable tensors (LoRA A/B, modules to save) under the model's own
    parameter names: what transformers' Trainer loads (non-strictly) on resume_from_checkpoint for a model that
    is not a PeftModel. Written beside the adapter of a trainer checkpoint only (see CausalLM.save_pretrained).
    Returns the file's path; raises WriteError (a ConfigError) when it cannot be written."""
    from safetensors.torch import save_file

    from fasttune.errors import os_error_of, write_error

    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    path = Path(folder) / TRAINABLE_NAME
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as e:  # disk full, no permission (OSError, or safetensors' error naming the os error)
        cause = os_error_of(e)
        if cause is None:
            raise
        path.unlink(missing_ok=True)
        raise write_error(cause, "the trainable tensors", path) from None
    return path


def read_adapter_config(folder: Path) -> dict:
    """The adapter's adapter_config.json; unreadable, invalid or unsupported ones raise ModelLoadError naming it."""
    cfg = read_json(Path(folder) / CONFIG_NAME, fix=ADAPTER_FIX)
    if not isinstance(cfg.get("r"), int) or isinstance(cfg.get("r"), bool):
        raise ModelLoadError(f"{folder / CONFIG_NAME} has no LoRA rank 'r' (a whole number), so it is not a "
                             f"complete LoRA adapter config. {ADAPTER_FIX}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{folder / CONFIG_NAME}: peft_type '{cfg.get('peft_type')}' is not supported; "
                             f"fasttune loads LoRA adapters.")
    return cfg


def classifier_head_settings(folder: Path) -> dict:
    """A classifier adapter's head settings as from_pretrained takes them (num_labels, id2label, label2id,
    problem_type), from the HEAD_NAME file fasttune writes beside the adapter, else num_labels alone from the saved
    head's rows (adapter_head_rows: adapters PEFT wrote). Raises ModelLoadError for an unreadable file."""
    path = Path(folder) / HEAD_NAME
    if not path.exists():
        return {"num_labels": adapter_head_rows(folder)}
    head = read_json(path, fix=ADAPTER_FIX)
    out = {k: head.get(k) for k in ("num_labels", "id2label", "label2id", "problem_type") if head.get(k) is not None}
    if "id2label" in out:
        out["id2label"] = {int(k): v for k, v in out["id2label"].items()}
    return out


def adapter_head_rows(folder: Path) -> int:
    """The number of classes a sequence classifier's adapter (task_type SEQ_CLS) was trained for: the rows of its
    saved head, `base_model.model.score.weight` (num_labels, hidden), read from the file's header. Raises
    ModelLoadError when the file or the head is missing."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_NAME
    key = f"{PREFIX}score.weight"
    try:
        with safe_open(str(path), framework="pt") as f:
            if key not in f.keys():
                raise ModelLoadError(f"{path} is a sequence classifier's adapter (task_type SEQ_CLS) without its head "
                                     f"'{key}'; fasttune's classifiers need it (PEFT saves it as a module to "
                                     f"save). {ADAPTER_FIX}")
            return int(f.get_slice(key).get_shape()[0])
    except ModelLoadError:
        raise
    except Exception as e:  # SafetensorError (a damaged header), OSError
        raise ModelLoadError(f"Cannot read {path} ({e}). {ADAPTER_FIX}") from None


def settings_from_peft_config(cfg: dict) -> LoraSettings:
    """LoraSettings from a PEFT adapter_config.json dict (as read_adapter_config checked it): PEFT's defaults where a
    field is absent (lora_alpha = r, dropout 0, bias "none"); a string target_modules (a regex) is kept as it is. Raises
    KeyError without `r`."""
    targets = cfg.get("target_modules")
    if targets is None and cfg.get("target_parameters"):
        targets = []  # PEFT allows target_modules=None when target_parameters are given
    return LoraSettings(r=cfg["r"], lora_alpha=cfg.get("lora_alpha", cfg["r"]),
                        lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                        target_modules=list(targets) if isinstance(targets, (list, set, tuple)) else targets,
                        use_rslora=bool(cfg.get("use_rslora", False)),
                        modules_to_save=list(cfg.get("modules_to_save") or []), bias=cfg.get("bias", "none"),
                        target_parameters=list(cfg.get("target_parameters") or []),
                        rank_pattern=dict(cfg.get("rank_pattern") or {}),
                        alpha_pattern=dict(cfg.get("alpha_pattern") or {}), use_dora=bool(cfg.get("use_dora")))


def load_adapter_into(model, folder: Path, seed: int | None = None):
    """Apply the adapter's LoRA layout to `model` and load its weights; refuses a mismatching adapter."""
    settings = settings_from_peft_config(read_adapter_config(folder))
    asked = copy.deepcopy(settings)  # apply_lora maps MoE names in place; per-expert adapters need the originals
    apply_lora(model, settings, seed=seed)
    model.lora_settings = settings
    path = folder / WEIGHTS_NAME
    if not path.exists():
        raise ModelLoadError(f"{folder} has no {WEIGHTS_NAME}; was the adapter saved completely?")
    saved = load_safetensors(path, fix=ADAPTER_FIX)
    # PEFT may also write `.lora_A.default.weight`-free names only; normalise an adapter-name infix if present.
    saved = {k.replace(".default.", "."): v for k, v in saved.items()}
    if has_per_expert_keys(saved):  # trained on transformers 4's per-expert MoE layers: stacked as PEFT does
        saved = stack_per_expert_adapter(model, saved, asked, folder, expert_adapter_keys(model))
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"Adapter {folder} does not match this base model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}. Load it onto the base it was trained from.")
    with torch.no_grad():
        for k, t in expected.items():
            if t.shape != saved[k].shape:
                raise ModelLoadError(f"Adapter {folder}: '{k}' has shape {tuple(saved[k].shape)}, the model expects "
                                     f"{tuple(t.shape)} (different base model or rank).")
            t.copy_(saved[k].to(t.dtype))
    return settings
