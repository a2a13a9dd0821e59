"""Settings of transformers' TrainingArguments and TRL's configs that our configs do not have as fields, so that a
config written for them (`SFTConfig(max_length=..., gradient_checkpointing=True, save_strategy="steps", ...)`) works
with only the import changed, or fails with a ConfigError that names the setting and the fix (not Python's
TypeError).

- TRL's current names of our fields are translated (`max_length` -> `max_seq_length`), and so are a few values
  (`fsdp="full_shard"` -> fsdp=True, `train_sampling_strategy="sequential"` -> shuffle=False, `chat_template_path`
  -> the template text of that file or tokenizer folder, TRL's `assistant_only_loss=True` ->
  train_on_responses_only=True).
- Bookkeeping settings that change nothing fasttune computes are accepted and dropped (run names, dataloader
  workers, hub ids with push_to_hub off, DDP tuning, eval gathering, ...).
- GRPO / RLOO: TRL's `use_vllm` and `vllm_*` settings, and `use_transformers_paged` /
  `use_transformers_continuous_batching`, are accepted (a warning when one is True): completions are
  sampled by fasttune's own generate() from the weights being trained.
- `gradient_checkpointing` is accepted: recompute is the model's setting here (`use_gradient_checkpointing` of
  get_peft_model, "auto" by default), not the trainer's.
- save_strategy / eval_strategy "no" and "steps" map onto save_steps / eval_steps; the others are refused.
- Settings that would change training and are not implemented are refused when set away from their default, with
  the fix (REFUSED).
- Any other setting of transformers' TrainingArguments or of TRL's config of the same name (when TRL is installed)
  is accepted at its upstream default and refused otherwise, naming the class that defines it: a script that
  spells out a default runs, and one that relies on an unimplemented setting learns which.
"""
from __future__ import annotations

import difflib
import functools
import warnings

from fasttune.errors import ConfigError

ALIASES = {"max_length": "max_seq_length"}
# TRL's choices of the engine that samples GRPO / RLOO completions -> what the warning adds: fasttune's generate()
# samples them whatever is chosen
SAMPLING_ENGINES = {
    "use_vllm": "no vLLM engine or server is started and the vllm_* settings are unused.",
    "use_transformers_paged": "transformers' paged generation is not used.",
    "use_transformers_continuous_batching": "transformers' continuous batching is not used."}
NO_EFFECT = {"run_name", "logging_dir", "logging_strategy", "logging_nan_inf_filter",
             "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
             "dataloader_prefetch_factor", "remove_unused_columns", "ddp_find_unused_parameters", "label_names",
             "disable_tqdm", "save_safetensors", "save_only_model", "hub_model_id", "hub_strategy", "hub_token",
             "hub_private_repo", "gradient_checkpointing", "gradient_checkpointing_kwargs", "dataset_kwargs",
             "model_init_kwargs", "include_tokens_per_second", "include_num_input_tokens_seen", "do_train",
             "do_eval", "overwrite_output_dir", "log_level", "use_liger_kernel", "average_tokens_across_devices",
             # memory, speed, logging or process bookkeeping: the trained weights do not depend on them
             "activation_checkpointing", "activation_checkpointing_kwargs", "liger_kernel_config", "use_cache",
             "torch_empty_cache_steps", "log_on_each_node", "log_level_replica", "project", "trackio_space_id",
             "trackio_bucket_id", "trackio_static_space_id", "eval_accumulation_steps", "eval_do_concat_batches",
             "eval_use_gather_object", "prediction_loss_only", "save_on_each_node", "hub_always_push", "hub_revision",
             "skip_memory_metrics", "do_predict", "local_rank", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
             "ddp_static_graph", "ddp_backend", "ddp_timeout", "dataloader_multiprocessing_context",
             "resume_from_checkpoint", "length_column_name",
             # TRL: padding shapes and eval packing leave every token's loss as it is (no cross-document attention)
             "pad_to_multiple_of", "eval_packing", "shuffle_dataset",
             # TRL: rows flattened without padding, attended per document; the same losses as padded rows, which
             # fasttune batches (right padding runs as plain causal attention; packing=True packs for speed)
             "padding_free",
             # TRL: the batch size of the reference log-probs' precompute, the generation cache's class, the
             # completions table's images and the continuous-batching engine's settings leave the losses as they are
             "precompute_ref_batch_size", "cache_implementation", "log_multimodal",
             "transformers_continuous_batching_config"}
# setting -> (values that keep fasttune's behaviour, the fix for any other value)
REFUSED = {
    "push_to_hub": ((False, None), "fasttune does not upload during training (no network at run time); save with "
                                   "model.save_pretrained and upload the folder yourself"),
    "torch_compile": ((False, None), "our decoder runs its own kernels; leave torch_compile off"),
    "neftune_noise_alpha": ((None,), "NEFTune noise is applied in supervised fine-tuning (SFTConfig); leave "
                                     "neftune_noise_alpha=None here"),
    "load_best_model_at_end": ((False, None), "the last step's weights are kept; pick a checkpoint from "
                                              "output_dir by its eval loss instead"),
    "label_smoothing_factor": ((0, 0.0, None), "label smoothing is applied in supervised fine-tuning "
                                               "(SFTConfig); leave it at 0 here"),
    "torch_compile_backend": ((None,), "our decoder runs its own kernels; leave torch_compile off"),
    "torch_compile_mode": ((None,), "our decoder runs its own kernels; leave torch_compile off"),
    "auto_find_batch_size": ((False, None), "set per_device_train_batch_size yourself (the model's "
                                            "use_gradient_checkpointing='auto' already picks what fits)"),
    "use_cpu": ((False, None), "fasttune trains on the GPU when one is visible; hide it with CUDA_VISIBLE_DEVICES= "
                               "to train on the CPU"),
    "deepspeed": ((None, ""), "fasttune does not run under DeepSpeed; launch several GPUs with torchrun (a model "
                              "copy per GPU), or add fsdp=True to shard the model"),
    "fsdp_config": ((None, {}), "fsdp=True shards every decoder layer (FSDP2); it takes no further options"),
    "activation_offloading": ((False, None), "pass use_gradient_checkpointing='offload' to "
                                             "FastLanguageModel.get_peft_model, which keeps layer inputs in host "
                                             "memory"),
    "trust_remote_code": ((False, None), "fasttune runs no code from model folders: its decoder or transformers' own "
                                         "classes load the model"),
    "metric_for_best_model": ((None,), "fasttune keeps the newest save_total_limit checkpoints and tracks no best "
                                       "one; each evaluation's loss is in log_history.jsonl"),
    "greater_is_better": ((None,), "fasttune tracks no best checkpoint (see metric_for_best_model)"),
    "dataloader_drop_last": ((False,), "fasttune trains on the last, smaller batch too; drop rows from the data "
                                       "instead"),
    "ignore_data_skip": ((False,), "a resumed run continues the data order where its checkpoint stopped"),
    "eos_token": ((None,), "set tokenizer.eos_token on the tokenizer you pass, before the trainer"),
    "pad_token": ((None,), "set tokenizer.pad_token on the tokenizer you pass, before the trainer"),
}
STRATEGIES = {"save_strategy": "save_steps", "eval_strategy": "eval_steps", "evaluation_strategy": "eval_steps"}
FSDP_SAME = {"full_shard", "auto_wrap"}  # transformers' fsdp options that fasttune's fsdp=True is


def translate(cls, kwargs: dict) -> dict:
    """`kwargs` for `cls` (a TrainingConfig dataclass) with the settings above translated or dropped. Raises
    ConfigError naming the setting for a refused value, a strategy other than "no" / "steps", a name given twice
    (an alias and its field), a chat_template_path that holds no template, a non-default value of an upstream
    setting fasttune does not implement, and any other unknown name (with the nearest field as a hint)."""
    names = set(cls.field_names())
    out = {}
    for key, value in kwargs.items():
        if key == "fsdp" and not isinstance(value, bool) and "fsdp" in names:
            if value is not None:  # None: transformers' default, no FSDP
                out["fsdp"] = _fsdp(cls, value)
        elif key == "output_dir" and value is None:
            continue  # transformers' default: our own default folder
        elif key == "warmup_steps" and is_share(value):
            if kwargs.get("warmup_ratio"):
                raise ConfigError(f"{cls.__name__}: warmup_steps={value} (a ratio, as transformers 5 reads a value "
                                  f"below 1) and warmup_ratio={kwargs['warmup_ratio']} are the same setting; give one.")
            out["warmup_ratio"] = value
        elif key == "loss_type" and isinstance(value, (list, tuple)) and key in names:
            if len(value) != 1 and not getattr(cls, "weighted_losses", False):
                raise ConfigError(f"{cls.__name__}(loss_type={list(value)!r}) is not supported: this trainer trains "
                                  f"one loss at a time (DPOConfig takes TRL's weighted list).")
            out[key] = value[0] if len(value) == 1 else list(value)  # TRL's list of one loss: its name
        elif key in names:
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
        elif key == "assistant_only_loss" and "train_on_responses_only" in names:
            if value and kwargs.get("train_on_responses_only") is False:
                raise ConfigError(f"{cls.__name__}: assistant_only_loss=True and train_on_responses_only=False "
                                  f"disagree; give one.")
            if value:
                out["train_on_responses_only"] = True  # TRL's name: the loss on the assistant turns only
        elif key == "train_sampling_strategy":
            _sampling(cls, value, kwargs, out)
        elif key == "chat_template_path" and "chat_template" in names:
            if value is not None:
                if kwargs.get("chat_template") is not None:
                    raise ConfigError(f"{cls.__name__}: chat_template and chat_template_path both give the chat "
                                      f"template; give one.")
                out["chat_template"] = template_from_path(value)
        elif (key in SAMPLING_ENGINES or key.startswith("vllm_")) and "num_generations" in names:
            if key in SAMPLING_ENGINES and value:
                warnings.warn(f"{cls.__name__}({key}=True): fasttune samples the completions with its own "
                              f"generate() (KV cache and decode kernels on the training GPU, from the weights being "
                              f"trained, so no importance-sampling correction is needed); {SAMPLING_ENGINES[key]}",
                              UserWarning, stacklevel=4)
        elif key in REFUSED:
            ok, fix = REFUSED[key]
            if value not in ok:
                raise ConfigError(f"{cls.__name__}({key}={value!r}) is not supported: {fix}.")
        elif key not in NO_EFFECT:
            _upstream_default_only(cls, key, value, names)
    if out.get("save_steps") is not None and kwargs.get("save_strategy") == "no" and "save_steps" in kwargs:
        out["save_steps"] = 0  # save_strategy='no' wins over a save_steps left over from another run
    return out


def is_share(value) -> bool:
    """transformers' reading of a *_steps value (warmup, logging, eval, save): a float strictly between 0 and 1 is a
    share of the run's steps."""
    return isinstance(value, float) and 0 < value < 1


def _fsdp(cls, value) -> bool:
    """transformers' fsdp option string (or list) as fasttune's fsdp switch: "" -> False; "full_shard" (with
    "auto_wrap") -> True, which is what fasttune's per-layer FSDP2 sharding is; other options are refused."""
    options = set(value.split() if isinstance(value, str) else value)
    if options <= FSDP_SAME:
        return bool(options)
    raise ConfigError(f"{cls.__name__}(fsdp={value!r}) is not supported: fasttune's fsdp=True shards every decoder "
                      f"layer's parameters, gradients and optimizer state (transformers' 'full_shard auto_wrap'); "
                      f"{', '.join(sorted(options - FSDP_SAME))} is not implemented. Use fsdp=True.")


def _sampling(cls, value, kwargs: dict, out: dict):
    """transformers' train_sampling_strategy: "random" is fasttune's shuffle=True, "sequential" shuffle=False,
    "group_by_length" group_by_length=True (shuffled)."""
    value = str(value)
    if value not in ("random", "sequential", "group_by_length"):
        raise ConfigError(f"{cls.__name__}(train_sampling_strategy={value!r}) is not supported: batches are drawn "
                          f"in random order ('random'), in the data's order ('sequential') or in shuffled blocks of "
                          f"similar lengths ('group_by_length').")
    if value == "group_by_length":
        if kwargs.get("group_by_length") is False:
            raise ConfigError(f"{cls.__name__}: train_sampling_strategy='group_by_length' and group_by_length=False "
                              f"disagree; give one.")
        out["group_by_length"] = True
    shuffle = value != "sequential"
    if "shuffle" in kwargs and bool(kwargs["shuffle"]) != shuffle:
        raise ConfigError(f"{cls.__name__}: train_sampling_strategy={value!r} and shuffle={kwargs['shuffle']!r} "
                          f"disagree; give one.")
    out["shuffle"] = shuffle


def template_from_path(path) -> str:
    """TRL's chat_template_path: the Jinja text of a template file, or the template of a tokenizer folder
    (chat_template.jinja, else tokenizer_config.json's "chat_template", a string or the entry named "default" of
    a list). Raises ConfigError naming the path when it holds none or cannot be read."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        if p.is_file():
            return p.read_text(encoding="utf-8")
        if (p / "chat_template.jinja").is_file():
            return (p / "chat_template.jinja").read_text(encoding="utf-8")
        if (p / "tokenizer_config.json").is_file():
            template = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                return template
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"chat_template_path={str(path)!r} could not be read ({e}); give a Jinja template file "
                          f"or a tokenizer folder.") from None
    raise ConfigError(f"chat_template_path={str(path)!r} holds no chat template: give a Jinja template file, or a "
                      f"tokenizer folder with chat_template.jinja or a chat_template in tokenizer_config.json.")


# configs TRL 1.x keeps under trl.experimental.<module>
TRL_EXPERIMENTAL = {"ORPOConfig": "orpo", "CPOConfig": "cpo", "TPOConfig": "tpo", "GKDConfig": "gkd",
                    "GMPOConfig": "gmpo", "OnlineDPOConfig": "online_dpo", "A2POConfig": "a2po",
                    "SDFTConfig": "sdft", "SDPOConfig": "sdpo",
                    "IWOPDConfig": "iw_opd"}


def _trl_config(name: str):
    """(owner, TRL's config class called `name`) from trl or trl.experimental (TRL_EXPERIMENTAL), or None when TRL
    is not installed, cannot be imported or has no such config."""
    import importlib

    try:
        import trl

        if name in TRL_EXPERIMENTAL:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TRL's notice that trl.experimental is unstable
                module = importlib.import_module(f"trl.experimental.{TRL_EXPERIMENTAL[name]}")
            return f"TRL's experimental {name}", getattr(module, name, None)
        return f"TRL's {name}", getattr(trl, name, None)
    except Exception:  # not installed, or broken by its own dependencies: transformers' names only
        return None


@functools.lru_cache(maxsize=None)
def upstream_defaults(cls) -> list[tuple[str, dict]]:
    """[(owner, {setting: default})] of the configs `cls` stands in for: transformers' TrainingArguments, and TRL's
    config of the same name as `cls` or one of its bases (SFTConfig, DPOConfig, ...; TRL_EXPERIMENTAL's from
    trl.experimental) when TRL is installed."""
    import dataclasses

    from transformers import TrainingArguments

    owners = [("transformers' TrainingArguments", TrainingArguments)]
    for base in cls.__mro__:
        found = _trl_config(base.__name__)
        if found is not None and dataclasses.is_dataclass(found[1]):
            owners.append(found)
            break
    out = []
    for owner, c in owners:
        defaults = {}
        for f in dataclasses.fields(c):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        out.append((owner, defaults))
    return out


def same_value(value, default) -> bool:
    """Whether a setting holds its default: transformers' str enums equal their strings, empty values each other."""
    value, default = getattr(value, "value", value), getattr(default, "value", default)
    try:
        return bool(value == default) or (value in ("", None, [], {}) and default in ("", None, [], {}))
    except Exception:  # a value whose == is not a plain bool (arrays): not the default
        return False


def _upstream_default_only(cls, key: str, value, names: set):
    """Accept `key` at the default of the upstream config that defines it; otherwise raise ConfigError naming that
    config (a setting fasttune does not implement) or, for a name no config has, the nearest field."""
    for owner, defaults in upstream_defaults(cls):
        if key in defaults:
            if same_value(value, defaults[key]):
                return
            raise ConfigError(f"{cls.__name__}({key}={value!r}) is not supported: fasttune does not implement "
                              f"{owner}.{key}; leave it at its default ({defaults[key]!r}) or remove it.")
    near = difflib.get_close_matches(key, sorted(names), n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"{cls.__name__} got an unknown setting '{key}'.{hint}")


class ConfigMeta(type):
    """The configs' metaclass: keyword arguments pass through `translate` before the dataclass __init__."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **translate(cls, kwargs))
