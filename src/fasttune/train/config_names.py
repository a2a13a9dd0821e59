"""Settings of transformers' TrainingArguments and TRL's configs that our configs do not have as fields, so that a
config written for them (`SFTConfig(max_length=..., gradient_checkpointing=True, save_strategy="steps", ...)`) works
with only the import changed, or fails with a ConfigError that names the setting and the fix (not Python's
TypeError).

- TRL's current names of our fields are translated (`max_length` -> `max_seq_length`).
- Bookkeeping settings that change nothing fasttune computes are accepted and dropped (run names, dataloader
  workers, hub ids with push_to_hub off, ...).
- `gradient_checkpointing` is accepted: recompute is the model's setting here (`use_gradient_checkpointing` of
  get_peft_model, "auto" by default), not the trainer's.
- save_strategy / eval_strategy "no" and "steps" map onto save_steps / eval_steps; the others are refused.
- Settings that would change training and are not implemented are refused when set away from their default.
"""
from __future__ import annotations

import difflib

from fasttune.errors import ConfigError

ALIASES = {"max_length": "max_seq_length"}
NO_EFFECT = {"run_name", "logging_dir", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
             "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
             "dataloader_prefetch_factor", "remove_unused_columns", "ddp_find_unused_parameters", "label_names",
             "disable_tqdm", "save_safetensors", "save_only_model", "hub_model_id", "hub_strategy", "hub_token",
             "hub_private_repo", "gradient_checkpointing", "gradient_checkpointing_kwargs", "dataset_kwargs",
             "model_init_kwargs", "include_tokens_per_second", "include_num_input_tokens_seen", "do_train",
             "do_eval", "overwrite_output_dir", "log_level", "use_liger_kernel", "average_tokens_across_devices"}
# setting -> (values that keep fasttune's behaviour, the fix for any other value)
REFUSED = {
    "push_to_hub": ((False, None), "fasttune does not upload during training (no network at run time); save with "
                                   "model.save_pretrained and upload the folder yourself"),
    "torch_compile": ((False, None), "our decoder runs its own kernels; leave torch_compile off"),
    "neftune_noise_alpha": ((None,), "NEFTune noise is not implemented; leave neftune_noise_alpha=None"),
    "group_by_length": ((False, None), "batches are drawn in the data's order (shuffled); leave it off"),
    "load_best_model_at_end": ((False, None), "the last step's weights are kept; pick a checkpoint from "
                                              "output_dir by its eval loss instead"),
    "padding_free": ((False, None), "use packing=True, which trains packed rows without cross-attention"),
    "completion_only_loss": ((None, True), "fasttune trains on the completion of prompt/completion rows (and on "
                                           "whole texts otherwise); for chat rows use train_on_responses_only=True"),
    "assistant_only_loss": ((False, None), "use train_on_responses_only=True (the assistant turns only)"),
    "eval_on_start": ((False, None), "evaluate with trainer.evaluate() before trainer.train()"),
}
STRATEGIES = {"save_strategy": "save_steps", "eval_strategy": "eval_steps", "evaluation_strategy": "eval_steps"}


def translate(cls, kwargs: dict) -> dict:
    """`kwargs` for `cls` (a TrainingConfig dataclass) with the settings above translated or dropped. Raises
    ConfigError naming the setting for a refused value, a strategy other than "no" / "steps", a name given twice
    (an alias and its field) and any other unknown name (with the nearest field as a hint)."""
    names = set(cls.field_names())
    out = {}
    for key, value in kwargs.items():
        if key in names:
            out[key] = value
        elif key in ALIASES and ALIASES[key] in names:
            if ALIASES[key] in kwargs:
                raise ConfigError(f"{cls.__name__}: {key} and {ALIASES[key]} are the same setting; give one.")
            out[ALIASES[key]] = value
        elif key in STRATEGIES:
            value = str(getattr(value, "value", value)).lower()
            if value not in ("no", "steps"):
                raise ConfigError(f"{cls.__name__}({key}={value!r}): fasttune saves and evaluates every "
                                  f"{STRATEGIES[key]} steps; use {key}='steps' with {STRATEGIES[key]}=N, or 'no'.")
            if value == "no" and key == "save_strategy" and "save_steps" not in kwargs:
                out["save_steps"] = 0
        elif key in REFUSED:
            ok, fix = REFUSED[key]
            if value not in ok:
                raise ConfigError(f"{cls.__name__}({key}={value!r}) is not supported: {fix}.")
        elif key not in NO_EFFECT:
            near = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"{cls.__name__} got an unknown setting '{key}'.{hint}")
    if out.get("save_steps") is not None and kwargs.get("save_strategy") == "no" and "save_steps" in kwargs:
        out["save_steps"] = 0  # save_strategy='no' wins over a save_steps left over from another run
    return out


class ConfigMeta(type):
    """The configs' metaclass: keyword arguments pass through `translate` before the dataclass __init__."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **translate(cls, kwargs))
