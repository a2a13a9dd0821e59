"""What TRL's trainers take besides a loaded model: `model=` as a path (loaded with its tokenizer) and `peft_config=`
(a PEFT LoraConfig the trainer applies), so that scripts written for them run with only the import changed."""
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


def load_named_model(model, tokenizer):
    """TRL's `model="path/or/id"`: (the model FastModel.from_pretrained loads, the tokenizer given or else the one
    loaded with it); anything else is returned as it is. Raises what from_pretrained raises for a bad path."""
    if not isinstance(model, (str, os.PathLike)):
        return model, tokenizer
    from fasttune.api import FastModel

    loaded, tok = FastModel.from_pretrained(str(model))
    return loaded, tokenizer if tokenizer is not None else tok
