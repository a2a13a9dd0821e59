"""TRL's `peft_config=` argument: a PEFT LoraConfig given to a trainer adds its LoRA to a base model, as TRL's trainers
do with PEFT's get_peft_model, so scripts that pass one run with only the import changed.

The config's fields map onto FastLanguageModel.get_peft_model's (r, lora_alpha, lora_dropout, target_modules,
use_rslora, use_dora, modules_to_save, bias, target_parameters, rank_pattern, alpha_pattern). `target_modules=None`
means PEFT's default for the architecture (peft.utils.constants' TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
q_proj and v_proj on the llama-like families), and where PEFT has none it needs target_modules, as in PEFT. Fields
that change what LoRA computes and that fasttune does not implement are refused with their name.
"""
from __future__ import annotations

from fasttune.errors import ConfigError

# PEFT LoraConfig fields that fasttune implements (passed on), or that do not change training (ignored).
_PASSED = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "modules_to_save", "bias",
           "target_parameters", "rank_pattern", "alpha_pattern")
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "init_lora_weights", "fan_in_fan_out", "megatron_core", "ensure_weight_tying"}


def _as_dict(peft_config) -> dict:
    if isinstance(peft_config, dict):
        return dict(peft_config)
    if hasattr(peft_config, "to_dict"):
        return peft_config.to_dict()
    raise ConfigError(f"peft_config must be a peft.LoraConfig (or its dict); got {type(peft_config).__name__}.")


def lora_kwargs(peft_config, model_type: str) -> dict:
    """get_peft_model keyword arguments for a PEFT LoraConfig (or its to_dict()) on a model of `model_type`
    (transformers' name). Raises ConfigError for another PEFT method, target_modules=None where PEFT has no default,
    and fields set away from their default that fasttune does not implement (named, with the fix)."""
    cfg = _as_dict(peft_config)
    kind = str(cfg.get("peft_type") or "LORA").rsplit(".", 1)[-1].upper()
    if kind != "LORA":
        raise ConfigError(f"peft_config is a {kind} config; fasttune trains LoRA (peft.LoraConfig, use_dora and "
                          f"use_rslora included).")
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    unsupported = sorted(k for k, v in cfg.items() if k not in _PASSED and k not in _IGNORED
                         and v != defaults.get(k) and v not in (None, False, [], {}))
    init = cfg.get("init_lora_weights", True)
    if init is not True:
        unsupported.append(f"init_lora_weights={init!r}")
    if cfg.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=True")
    if unsupported:
        raise ConfigError(f"peft_config sets {', '.join(unsupported)}, which fasttune does not implement; remove "
                          f"them (fasttune's LoRA uses PEFT's default initialisation on every targeted layer).")
    out = {k: cfg.get(k) for k in _PASSED if cfg.get(k) is not None}
    if isinstance(out.get("target_modules"), (set, tuple)):
        out["target_modules"] = sorted(out["target_modules"])
    if "target_modules" not in out and not out.get("target_parameters"):
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        if model_type not in PEFT_DEFAULTS:
            raise ConfigError(f"peft_config has target_modules=None and PEFT has no default for '{model_type}' "
                              f"models; name them, e.g. LoraConfig(target_modules=['q_proj', 'k_proj', 'v_proj', "
                              f"'o_proj', 'gate_proj', 'up_proj', 'down_proj']).")
        out["target_modules"] = list(PEFT_DEFAULTS[model_type])
    return out
