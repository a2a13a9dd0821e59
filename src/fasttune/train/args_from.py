"""The trainer's config from what scripts pass as `args=`: fasttune's own config, transformers' TrainingArguments or
another trainer's config (TRL's SFTConfig, ...), plus the settings older TRL trainers took as their own keyword
arguments (`SFTTrainer(..., dataset_text_field="text", max_seq_length=2048, packing=False)`, what the peer's
notebooks pass). Each setting goes through the config class's own checks, so one fasttune does not implement is
refused by name, as when it is given to the config directly."""
from __future__ import annotations

import dataclasses

from fasttune.train.config_names import ALIASES, same_value

# Older TRL trainers' keyword arguments that are config fields today, per trainer: folded into `args`.
LEGACY_TRAINER_ARGS = {
    "SFTTrainer": ("dataset_text_field", "max_seq_length", "packing", "dataset_num_proc", "dataset_batch_size",
                   "dataset_kwargs", "neftune_noise_alpha", "eval_packing"),
    # the peer's DPO / ORPO notebooks: DPOTrainer(..., beta=0.1, max_length=1024, max_prompt_length=512)
    "DPOTrainer": ("beta", "max_length", "max_prompt_length", "loss_type", "label_smoothing"),
    "ORPOTrainer": ("beta", "max_length", "max_prompt_length"),
    "CPOTrainer": ("beta", "max_length", "max_prompt_length", "loss_type", "label_smoothing"),
    "KTOTrainer": ("beta", "max_length", "max_prompt_length"),
}
# Fields transformers' TrainingArguments fills in from others in its __post_init__ (not settings of their own).
DERIVED = ("logging_dir", "accelerator_config")


def legacy_trainer_args(trainer_name: str, kwargs: dict) -> dict:
    """Pop (from `kwargs`) and return the older trainer keyword arguments `trainer_name` folds into its config."""
    names = LEGACY_TRAINER_ARGS.get(trainer_name, ())
    return {k: kwargs.pop(k) for k in names if k in kwargs}


def config_from(args, config_cls, overrides: dict | None = None):
    """`args` as a `config_cls` instance, with `overrides` (field -> value) applied.

    Args: args: None (config_cls's defaults), a config_cls instance (used as it is, or copied with the overrides), or
        another dataclass config (transformers' TrainingArguments, TRL's configs): its settings that differ from
        that class's defaults become config_cls's, by name. overrides: legacy_trainer_args' values.
    Returns: a config_cls instance. Raises ConfigError (from config_cls) for a setting it refuses.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    # (older TRL's max_length for SFT is max_seq_length here: an alias would clash with the copied field)
    overrides = {ALIASES.get(k, k) if ALIASES.get(k) in names and k not in names else k: v
                 for k, v in (overrides or {}).items()}
    if args is None:
        return config_cls(**overrides) if overrides else config_cls()
    if isinstance(args, config_cls):
        return dataclasses.replace(args, **overrides) if overrides else args
    settings = {}
    if dataclasses.is_dataclass(args):
        for f in dataclasses.fields(args):
            if not f.init or f.name in DERIVED or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else \
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            value = getattr(args, f.name, default)
            if default is dataclasses.MISSING or not same_value(value, default):
                settings[f.name] = getattr(value, "value", value)  # (transformers' str enums as their strings)
    return config_cls(**{**settings, **overrides})

