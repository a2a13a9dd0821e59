"""What TRL's trainers take besides a loaded model: `model=` as a path (loaded with its tokenizer) and `peft_config=`
(a PEFT LoraConfig the trainer applies), so that scripts written for them run with only the import changed; and
transformers' / TRL's other trainer arguments, accepted when None and otherwise refused naming the fix."""
from __future__ import annotations

import os

from fasttune.errors import ConfigError


def add_peft_config(model, peft_config, args):
    """The model with the LoRA a TRL-style `peft_config` (peft.LoraConfig or its dict) describes
    (peft/peft_config.py), added as FastLanguageModel.get_peft_model adds it, seeded by args.seed. Raises
    ConfigError for a model that already has LoRA or is not one of ours, and for configs peft_config.py refuses."""
    from fasttune.api import FastLanguageModel
    from fasttune.peft.peft_config import lora_kwargs

    if not hasattr(model, "lora_settings"):
        raise ConfigError(f"peft_config needs a model loaded with FastLanguageModel.from_pretrained; got "
                          f"{type(model).__name__}.")
    if model.lora_settings is not None:
        raise ConfigError("peft_config was given for a model that already has LoRA adapters (get_peft_model was "
                          "called, or an adapter was loaded): drop peft_config, or pass the base model.")
    model_type = getattr(getattr(model, "hf_config", None), "model_type", "")
    return FastLanguageModel.get_peft_model(model, random_state=getattr(args, "seed", 3407),
                                            **lora_kwargs(peft_config, model_type))


def disable_dropout(model) -> None:
    """TRL's disable_dropout=True: every torch.nn.Dropout in `model` (LoRA's lora_dropout, and a transformers model's
    own) gets p=0, as trl.trainer.utils.disable_dropout_in_model does. The adapter's saved lora_dropout is unchanged,
    as with TRL."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_named_model(model, tokenizer):
    """TRL's `model="path/or/id"`: (the model FastModel.from_pretrained loads, the tokenizer given or else the one
    loaded with it); anything else is returned as it is. Raises what from_pretrained raises for a bad path."""
    if not isinstance(model, (str, os.PathLike)):
        return model, tokenizer
    from fasttune.api import FastModel

    loaded, tok = FastModel.from_pretrained(str(model))
    return loaded, tokenizer if tokenizer is not None else tok


# transformers' Trainer and TRL's trainers' arguments that fasttune's trainers do not implement -> the fix. None (their
# default) is accepted, so a script that passes them explicitly unset runs.
NOT_IMPLEMENTED = {
    "compute_metrics": "only SFTTrainer's evaluation gathers predictions for it; this trainer logs its own eval "
                       "metrics",
    "preprocess_logits_for_metrics": "only SFTTrainer takes it, with compute_metrics",
    "compute_loss_func": "the objective's loss runs fused with the LM head in fasttune's kernels; a custom loss "
                         "function is not implemented",
    "model_init": "pass the model itself as model=",
    "optimizer_cls_and_kwargs": "pass optimizers=(your_optimizer, None): an optimizer you build over the model's "
                                "trainable parameters, with the config's schedule",
    "data_collator": "this trainer batches its own examples (SFTTrainer takes a data_collator)",
    # (the peer's DPO notebooks pass ref_model=None, TRL's PEFT way, which is what fasttune does)
    "ref_model": "the reference is the model as handed to the trainer (its LoRA switched off, a frozen copy of an "
                 "adapter already trained, or with full fine-tuning a copy of every weight), as TRL takes it with "
                 "ref_model=None; a separate reference model is not implemented, so leave ref_model out (or None)",
    # TRL's GRPO / RLOO agent rollouts: fasttune samples single-turn completions with its own generate()
    "tools": "this trainer samples its completions in one turn, as TRL's trainer of its name does; tool calls "
             "inside a rollout run in GRPOTrainer (and GMPOTrainer): use one of those, or score the completions' "
             "tool calls in a reward function",
    "rollout_func": "this trainer samples its completions with fasttune's generate(); a custom rollout function "
                    "runs in GRPOTrainer (and GMPOTrainer): use one of those",
    "environment_factory": "this trainer samples its completions in one turn, as TRL's trainer of its name does; "
                           "environments run in GRPOTrainer (and GMPOTrainer): use one of those",
}


def check_trainer_kwargs(trainer_name: str, kwargs: dict):
    """Refuse keyword arguments a trainer does not take: ConfigError naming each one, with the fix for transformers'
    and TRL's arguments fasttune does not implement (NOT_IMPLEMENTED; None is accepted for those)."""
    unknown = sorted(k for k, v in kwargs.items() if not (k in NOT_IMPLEMENTED and v is None))
    if not unknown:
        return
    fixes = [f"{k}: {NOT_IMPLEMENTED[k]}" for k in unknown if k in NOT_IMPLEMENTED]
    rest = [k for k in unknown if k not in NOT_IMPLEMENTED]
    parts = ([f"{trainer_name} does not implement " + "; ".join(fixes) + "."] if fixes else []) + \
        ([f"{trainer_name} got unknown arguments {rest}."] if rest else [])
    raise ConfigError(" ".join(parts))


def router_aux_loss_weight(model, coef: float | None) -> float:
    """The weight of the MoE load-balancing loss under TRL 1.16's `router_aux_loss_coef` (SFT / DPO / KTO / GRPO /
    RLOO configs): `coef`, else the model config's own `router_aux_loss_coef`, on a mixture-of-experts model (its
    text config has `output_router_logits`); 0.0 (off) on any other model or when that value is 0.
    Raises ConfigError for a non-zero coef on a model without router logits."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if coef and not hasattr(text, "output_router_logits"):
        raise ConfigError(f"router_aux_loss_coef={coef}: this {text.model_type} model is not a mixture of experts "
                          f"with router logits, so there is no load-balancing loss to weight; leave it None.")
    value = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    return float(value or 0.0) if hasattr(text, "output_router_logits") else 0.0


def apply_router_aux_loss_coef(model, coef: float | None) -> None:
    """TRL's SFTTrainer / DPOTrainer / KTOTrainer setting of `router_aux_loss_coef`: the load-balancing loss is on
    whenever router_aux_loss_weight is not 0, and the model config is set to match (`output_router_logits`,
    `router_aux_loss_coef`), as TRL's SFTTrainer sets it; our models and the fallback then add it in their forward.
    Raises ConfigError as router_aux_loss_weight."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = router_aux_loss_weight(model, coef)
    if hasattr(text, "router_aux_loss_coef") and hasattr(text, "output_router_logits"):
        for c in {id(text): text, id(config): config}.values():  # (our forward reads model.config)
            c.output_router_logits = bool(value)
            c.router_aux_loss_coef = value
