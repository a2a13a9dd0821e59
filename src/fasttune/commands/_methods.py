"""`fasttune train --method`: the training methods (trainer and config classes, imported only when asked for), and
the score head a classifier method loads its model with."""
from __future__ import annotations

from fasttune.errors import ConfigError

# --method -> (trainer, config) as "module:name", imported only when that method is asked for.
METHODS = {
    "sft": ("fasttune.train.objectives.sft:SFTTrainer", "fasttune.train.config:SFTConfig"),
    "dpo": ("fasttune.train.objectives.dpo:DPOTrainer", "fasttune.train.objectives.dpo:DPOConfig"),
    "orpo": ("fasttune.train.objectives.orpo:ORPOTrainer", "fasttune.train.objectives.orpo:ORPOConfig"),
    "cpo": ("fasttune.train.objectives.cpo:CPOTrainer", "fasttune.train.objectives.cpo:CPOConfig"),
    "tpo": ("fasttune.train.objectives.tpo:TPOTrainer", "fasttune.train.objectives.tpo:TPOConfig"),
    "kto": ("fasttune.train.objectives.kto:KTOTrainer", "fasttune.train.objectives.kto:KTOConfig"),
    "grpo": ("fasttune.train.objectives.grpo:GRPOTrainer", "fasttune.train.objectives.grpo:GRPOConfig"),
    "gmpo": ("fasttune.train.objectives.gmpo:GMPOTrainer", "fasttune.train.objectives.gmpo:GMPOConfig"),
    "rloo": ("fasttune.train.objectives.rloo:RLOOTrainer", "fasttune.train.objectives.rloo:RLOOConfig"),
    "online_dpo": ("fasttune.train.objectives.online_dpo:OnlineDPOTrainer",
                   "fasttune.train.objectives.online_dpo:OnlineDPOConfig"),
    "a2po": ("fasttune.train.objectives.a2po:A2POTrainer", "fasttune.train.objectives.a2po:A2POConfig"),
    "sdft": ("fasttune.train.objectives.sdft:SDFTTrainer", "fasttune.train.objectives.sdft:SDFTConfig"),
    "sdpo": ("fasttune.train.objectives.sdpo:SDPOTrainer", "fasttune.train.objectives.sdpo:SDPOConfig"),
    "iw_opd": ("fasttune.train.objectives.iw_opd:IWOPDTrainer", "fasttune.train.objectives.iw_opd:IWOPDConfig"),
    "distillation": ("fasttune.train.objectives.distillation:DistillationTrainer",
                     "fasttune.train.objectives.distillation:DistillationConfig"),
    "gkd": ("fasttune.train.objectives.gkd:GKDTrainer", "fasttune.train.objectives.gkd:GKDConfig"),
    "reward": ("fasttune.train.objectives.reward:RewardTrainer", "fasttune.train.objectives.reward:RewardConfig"),
    "classification": ("fasttune.train.objectives.classification:ClassificationTrainer",
                       "fasttune.train.objectives.classification:ClassificationConfig"),
}
PREFERENCE_METHODS = ("dpo", "orpo", "cpo", "tpo", "kto", "reward")
CLASSIFIER_METHODS = ("reward", "classification")  # loaded with a score head in place of the LM head


def _import(dotted: str):
    import importlib

    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def load_method(method: str) -> tuple[type, type]:
    """(trainer class, config class) of a --method. Raises ConfigError for a method outside METHODS or one whose
    modules cannot be imported."""
    if method not in METHODS:
        raise ConfigError(f"--method {method} is not a training method; choose one of: {', '.join(METHODS)}.")
    trainer, config = METHODS[method]
    try:
        return _import(trainer), _import(config)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--method {method} is not available in this installation of fasttune ({e}). Use one of "
                          f"the other methods, or update fasttune.") from None


def method_config(method: str) -> type:
    """The config class of a --method (SFTConfig, DPOConfig, ...), without importing its trainer. Raises ConfigError
    as load_method."""
    if method not in METHODS:
        raise ConfigError(f"--method {method} is not a training method; choose one of: {', '.join(METHODS)}.")
    try:
        return _import(METHODS[method][1])
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--method {method} is not available in this installation of fasttune ({e}). Use one of "
                          f"the other methods, or update fasttune.") from None


def classifier_head(method: str, rows, config, data) -> dict:
    """from_pretrained's head keywords for `method`: {} for the language-model methods; a one-output score head for
    "reward"; for "classification" the head the rows' labels ask for (data/classification.label_space over
    config.label_field: num_labels, id2label for class names, problem_type). Raises DataError for labels that
    name no head."""
    if method not in CLASSIFIER_METHODS:
        return {}
    head = {"auto_model": "AutoModelForSequenceClassification"}
    if method == "reward":
        return {**head, "num_labels": 1}
    from fasttune.data.classification import label_space
    from fasttune.data.sources import source_name

    return {**head, **label_space(rows, config.label_field, source_name(data))}
