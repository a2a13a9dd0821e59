"""TrainingConfig: the fields every method's config shares (the loop's batching, schedule, optimizer, precision,
checkpoints, logging, data and distributed settings); SFTConfig, DPOConfig, ORPOConfig, KTOConfig and GRPOConfig
derive from it. Every field is also a CLI flag (--field-name) and a YAML key."""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, fields

from fasttune.errors import ConfigError
from fasttune.train.choices import (BORROWED_OPTIMIZERS, METRIC_SCHEDULES, OPTIMIZERS, SCHEDULE_NAMES,
                                     SIMPLE_SCHEDULES)
from fasttune.train.config_names import ConfigMeta, is_share


@dataclass
class TrainingConfig(metaclass=ConfigMeta):
    """The settings of a training run that every method shares, named as in transformers' TrainingArguments / TRL.
    Their other settings are translated, dropped or refused by name (train/config_names.py).

    Raises ConfigError (in __post_init__) for a value of the wrong type that cannot be coerced (YAML's '1e-4' is
    coerced), an out-of-range number, an unknown lr_scheduler_type / optim / chat_template name, bf16 and fp16
    together, or a report_to whose package is not installed.
    """

    output_dir: str = "outputs"
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    embedding_learning_rate: float | None = None
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"  # any of transformers' schedules that need no metric (train/optim.py)
    lr_scheduler_kwargs: dict | None = None  # that schedule's own keywords, e.g. {"min_lr_rate": 0.1}; JSON on the CLI
    weight_decay: float = 0.0
    optim: str = "adamw"
    optim_args: str | None = None  # "key=value,..." for transformers' other optimizers (e.g. ademamix's alpha)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int | float = 1  # a float below 1 is a share of the run's steps, as in transformers
    logging_first_step: bool = False  # also log step 1
    save_steps: int | float = 0  # 0: no intermediate checkpoints; below 1: a share of the run's steps
    save_total_limit: int | None = None
    overwrite_output_dir: bool = False  # a new run into a folder with another run's checkpoints deletes them
    eval_steps: int | float | None = None  # below 1: a share of the run's steps
    eval_on_start: bool = False  # evaluate (and log at step 0) before the first step of a new run
    seed: int = 3407
    data_seed: int | None = None  # seeds the data order (shuffle); None: seed, as in transformers
    max_seq_length: int = 2048
    packing: bool = False
    dataset_text_field: str = "text"
    data_format: str = "auto"
    train_on_responses_only: bool = False
    drop_long: bool = False  # drop rows longer than max_seq_length instead of truncating them
    dataset_num_proc: int | None = None  # tokenizing processes; None: 1 below 10k rows, else min(8, cpus)
    chat_template: str | None = None  # a name from fasttune.data.templates (chatml, llama-3, ...) or a Jinja string
    shuffle: bool = True
    # transformers' train_sampling_strategy="group_by_length": each optimizer step's rows drawn from a shuffled block of
    # similar lengths (less padding), transformers' get_length_grouped_indices on the shuffle's generator
    group_by_length: bool = False
    tf32: bool | None = None  # CUDA: allow TF32 for fp32 matmuls and convolutions (True) or not (False); None: torch's
    bf16: bool | None = None
    fp16: bool | None = None
    max_nonfinite_steps: int = 5  # consecutive skipped steps (NaN/inf loss or grads) before stopping
    report_to: str | list = "none"  # "none" | "tensorboard" | "wandb" | "all" | "a,b" | a list; becomes a list
    fsdp: bool = False  # under torchrun: shard the model over the ranks (FSDP2) instead of a copy per GPU
    cuda_graphs: bool = False  # SFT: replay each micro-batch's forward+backward as a CUDA graph (train/cuda_graphs.py)
    # Layers rebuild their norm / activation outputs in backward instead of keeping them (kernels/rebuild.py): None
    # lets use_gradient_checkpointing="auto" decide (on when memory is the limit); True / False forces it
    lean_saves: bool | None = None

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _checked_type(f.name, f.type, getattr(self, f.name)))
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "max_seq_length", "max_nonfinite_steps")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid: it must be a whole number >= 1.")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_ratio", "num_train_epochs"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{name}={v!r} is invalid: it must be a number >= 0.")
        if self.group_by_length and not self.shuffle:
            raise ConfigError("group_by_length=True draws shuffled blocks of similar lengths, and shuffle=False keeps "
                              "the data's order; give one (transformers' train_sampling_strategy is one of them).")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps={self.max_steps} is invalid: give the number of optimizer steps (>= 1), "
                              f"or -1 to train for num_train_epochs.")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: it must be a whole number >= 0 "
                                  f"(0 turns it off).")
        if not is_share(self.logging_steps) and (isinstance(self.logging_steps, float) or self.logging_steps < 1):
            raise ConfigError(f"logging_steps={self.logging_steps!r} is invalid: it must be a whole number >= 1, or a "
                              f"share of the run's steps between 0 and 1.")
        for name in ("eval_steps", "save_total_limit"):
            if is_share(getattr(self, name)):
                continue
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: it must be a whole number >= 1, or "
                                  f"None (unset).")
        if self.embedding_learning_rate is not None and self.embedding_learning_rate < 0:
            raise ConfigError(f"embedding_learning_rate={self.embedding_learning_rate!r} must be >= 0 or None.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("Set max_steps > 0 or num_train_epochs > 0; with neither, there is nothing to train.")
        self.lr_scheduler_type = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
        if self.lr_scheduler_type in METRIC_SCHEDULES:
            raise ConfigError(f"lr_scheduler_type='{self.lr_scheduler_type}' follows an evaluation metric, which "
                              f"fasttune's loop does not feed it; use one of {SCHEDULE_NAMES}.")
        if self.lr_scheduler_type not in SCHEDULE_NAMES:
            raise ConfigError(f"lr_scheduler_type='{self.lr_scheduler_type}' is not supported; use one of "
                              f"{SCHEDULE_NAMES}.")
        if self.lr_scheduler_kwargs or self.lr_scheduler_type not in SIMPLE_SCHEDULES:
            # Bad keywords fail here, before a model loads (this imports transformers' trainer utilities, ~3 s on a
            # CPU, which training imports anyway; the plain schedules skip it).
            from fasttune.train.optim import lr_lambda

            lr_lambda(self.lr_scheduler_type, 1, 10, self.lr_scheduler_kwargs, self.learning_rate or 1.0)(5)
        self.optim = str(getattr(self.optim, "value", self.optim))
        if self.optim not in OPTIMIZERS + BORROWED_OPTIMIZERS:
            raise ConfigError(f"optim='{self.optim}' is not supported; use one of {OPTIMIZERS + BORROWED_OPTIMIZERS}.")
        if self.warmup_ratio > 1:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} must be between 0 and 1.")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16=True and fp16=True together: choose one.")
        if self.chat_template is not None:
            from fasttune.data.templates import template_name
            template_name(self.chat_template)  # unknown names: ConfigError listing the built-in ones
        from fasttune.train.reporters import parse_report_to

        self.report_to = parse_report_to(self.report_to)  # also checks the packages are installed

    @classmethod
    def field_names(cls) -> list[str]:
        """The config's field names, in declaration order (the base's first)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainingConfig":
        """`cls(**values)`. Raises ConfigError naming `source` for a key that is not a field (with the nearest
        field name as a hint), and whatever __post_init__ raises for a bad value."""
        names = cls.field_names()
        for k in values:
            if k not in names:
                near = difflib.get_close_matches(k, names, n=1)
                hint = f" Did you mean '{near[0]}'?" if near else ""
                raise ConfigError(f"{source}: unknown setting '{k}'.{hint}")
        return cls(**values)


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning's config (SFTTrainer; also UnslothTrainingArguments): TrainingConfig's fields, of which
    packing, dataset_text_field, data_format, train_on_responses_only and dataset_num_proc shape the SFT examples,
    and TRL's loss_type: "nll" (cross-entropy) or "dft" (Dynamic Fine-Tuning, Wu et al. 2025: each target token's
    cross-entropy weighted by its probability, detached); neftune_noise_alpha: transformers' NEFTune (Jain et al.
    2023), uniform noise of magnitude alpha / sqrt(T x H) added to the input embeddings of each training forward
    (train/neftune.py); label_smoothing_factor e: transformers' label smoothing, each target's loss (1 - e) x
    cross-entropy + e x the mean of -log p over the vocabulary (its LabelSmoother), in training and evaluation.
    Raises ConfigError as TrainingConfig does, and for another loss_type, an alpha <= 0, a label_smoothing_factor
    outside [0, 1) or with loss_type="dft"."""

    loss_type: str = "nll"
    # TRL's: prompt/completion rows train on the completion only (None or True), or on prompt and completion (False)
    completion_only_loss: bool | None = None
    neftune_noise_alpha: float | None = None  # NEFTune's alpha (the paper and TRL's docs use 5); None: off
    label_smoothing_factor: float = 0.0  # transformers' name; 0.1 is common
    # TRL's MoE load-balancing loss weight; None: the model config's (so it is on for MoE models, as in TRL 1.16)
    router_aux_loss_coef: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in ("nll", "dft"):
            raise ConfigError(f"loss_type={self.loss_type!r} is not supported by SFT; use 'nll' (cross-entropy) or "
                              f"'dft' (Dynamic Fine-Tuning), TRL's two.")
        if self.neftune_noise_alpha is not None and not self.neftune_noise_alpha > 0:
            raise ConfigError(f"neftune_noise_alpha={self.neftune_noise_alpha!r} is invalid: NEFTune's noise "
                              f"magnitude must be > 0 (5 is the paper's), or None to turn it off.")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ConfigError(f"label_smoothing_factor={self.label_smoothing_factor!r} is invalid: the share of the "
                              f"loss spread over the vocabulary, in [0, 1) (0.1 is common; 0 turns it off).")
        if self.lean_saves and self.fsdp:
            raise ConfigError("lean_saves=True with fsdp=True: lean saves are untested under FSDP (their rebuild reads "
                              "the norm weight FSDP frees between the passes). Leave lean_saves unset.")
        if self.neftune_noise_alpha is not None and self.cuda_graphs:
            raise ConfigError("neftune_noise_alpha with cuda_graphs=True: NEFTune's noise scale depends on each "
                              "batch's padded length, which CUDA graphs fix to the longest row; use one of the two.")
        if self.label_smoothing_factor and self.loss_type == "dft":
            raise ConfigError("label_smoothing_factor and loss_type='dft' do not combine (TRL's DFT loss replaces "
                              "transformers' label smoother); use one of them.")


def steps_every(value, total: int) -> int:
    """A logging/eval/save interval for a run of `total` optimizer steps: a share (0 < value < 1) becomes
    ceil(value * total) steps, as transformers' Trainer computes it; whole numbers (and 0 / None: off) stay."""
    return math.ceil(value * total) if is_share(value) else (value or 0)


def _checked_type(name: str, annotation: str, value):
    """Values from YAML/JSON arrive loosely typed ('1e-4' is a string in YAML): coerce numbers, refuse the rest.
    A dict field takes a dict, or its JSON text (the CLI, as transformers' TrainingArguments)."""
    kinds = {k.strip() for k in str(annotation).split("|")}
    if value is None and "None" in kinds:
        return value
    if "dict" in kinds:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name}={value!r} is not valid JSON ({e.msg} at character {e.pos}): give an "
                                  f"object such as '{{\"min_lr_rate\": 0.1}}'.") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is invalid: it must be a mapping of names to values.")
        return value
    if "list" in kinds and isinstance(value, (list, tuple)):
        return list(value)
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")  # quoted in YAML/JSON: 'true'
        raise ConfigError(f"{name}={value!r} is invalid: use true or false.")
    if "int" in kinds:
        if isinstance(value, str):  # '8', '1e3' (quoted, or a YAML 1.1 float without a dot)
            try:
                value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if "float" in kinds and is_share(value):  # logging/eval/save steps: a share of the run
            return value
        raise ConfigError(f"{name}={value!r} is invalid: it must be a whole number.")
    if "float" in kinds:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}={value!r} is invalid: it must be a number.")
    if "str" in kinds and not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} is invalid: it must be a text value.")
    return value
