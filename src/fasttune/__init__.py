"""fasttune: fine-tune LLMs (LoRA, full) fast and lean, with exports the ecosystem loads.

Public names are imported on first use, so `import fasttune.models` (the GPU benchmark, the CLI's --help) does
not pay for the data stack.
"""
import os

from fasttune.errors import FastTuneError

# Training allocates tensors of many sizes (long sequences, recompute, offload); with fixed-size segments the
# caching allocator's reserve grew to twice the allocated peak (34.6 GiB reserved for 16.8 GiB, 8B at 32K tokens).
# Expandable segments let a segment grow instead. A default only, read when CUDA first allocates: a value the
# user set (even empty) wins, and it has no effect once CUDA has allocated in this process.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

__version__ = "0.1.0"
_LAZY = {"FastLanguageModel": "fasttune.api", "FastModel": "fasttune.api", "FastVisionModel": "fasttune.api",
         "VisionDataCollator": "fasttune.data.vision_rows",
         "UnslothVisionDataCollator": "fasttune.data.vision_rows:VisionDataCollator",
         "SFTTrainer": "fasttune.train.objectives.sft",
         "SFTConfig": "fasttune.train.config", "GRPOTrainer": "fasttune.train.objectives.grpo",
         "GRPOConfig": "fasttune.train.objectives.grpo_config",
         "RLOOTrainer": "fasttune.train.objectives.rloo", "RLOOConfig": "fasttune.train.objectives.grpo_config",
         "DPOTrainer": "fasttune.train.objectives.dpo", "DPOConfig": "fasttune.train.objectives.dpo",
         "ORPOTrainer": "fasttune.train.objectives.orpo", "ORPOConfig": "fasttune.train.objectives.orpo",
         "CPOTrainer": "fasttune.train.objectives.cpo", "CPOConfig": "fasttune.train.objectives.cpo",
         "TPOTrainer": "fasttune.train.objectives.tpo", "TPOConfig": "fasttune.train.objectives.tpo",
         "KTOTrainer": "fasttune.train.objectives.kto", "KTOConfig": "fasttune.train.objectives.kto",
         "RewardTrainer": "fasttune.train.objectives.reward", "RewardConfig": "fasttune.train.objectives.reward",
         "DistillationTrainer": "fasttune.train.objectives.distillation",
         "DistillationConfig": "fasttune.train.objectives.distillation",
         "GKDTrainer": "fasttune.train.objectives.gkd", "GKDConfig": "fasttune.train.objectives.gkd",
         "GMPOTrainer": "fasttune.train.objectives.gmpo", "GMPOConfig": "fasttune.train.objectives.gmpo",
         "OnlineDPOTrainer": "fasttune.train.objectives.online_dpo",
         "OnlineDPOConfig": "fasttune.train.objectives.online_dpo",
         "A2POTrainer": "fasttune.train.objectives.a2po", "A2POConfig": "fasttune.train.objectives.a2po",
         "SDFTTrainer": "fasttune.train.objectives.sdft", "SDFTConfig": "fasttune.train.objectives.sdft",
         "SDPOTrainer": "fasttune.train.objectives.sdpo", "SDPOConfig": "fasttune.train.objectives.sdpo",
         "IWOPDTrainer": "fasttune.train.objectives.iw_opd", "IWOPDConfig": "fasttune.train.objectives.iw_opd",
         "BEMACallback": "fasttune.train.bema",
         "ClassificationTrainer": "fasttune.train.objectives.classification",
         "ClassificationConfig": "fasttune.train.objectives.classification",
         "is_bfloat16_supported": "fasttune.dropin", "PatchDPOTrainer": "fasttune.dropin",
         "is_bf16_supported": "fasttune.dropin:is_bfloat16_supported",  # (the vision notebooks' spelling)
         "PatchFastRL": "fasttune.dropin", "unsloth_train": "fasttune.dropin",
         # Other fine-tuners' names for our trainer and its config (both take embedding_learning_rate).
         "UnslothTrainer": "fasttune.train.objectives.sft:SFTTrainer",
         "UnslothTrainingArguments": "fasttune.train.config:SFTConfig",
         # The dataset helpers scripts also import from the package itself (`from unsloth import to_sharegpt`).
         **{name: "fasttune.chat_templates" for name in (
             "get_chat_template", "standardize_sharegpt", "standardize_data_formats", "to_sharegpt",
             "apply_chat_template", "train_on_responses_only")}}
__all__ = ["FastLanguageModel", "SFTTrainer", "SFTConfig", "GRPOTrainer", "GRPOConfig", "RLOOTrainer", "RLOOConfig",
           "DPOTrainer", "DPOConfig",
           "ORPOTrainer", "ORPOConfig", "CPOTrainer", "CPOConfig", "TPOTrainer", "TPOConfig", "KTOTrainer",
           "KTOConfig", "RewardTrainer",
           "RewardConfig",
           "DistillationTrainer", "DistillationConfig", "GKDTrainer", "GKDConfig", "GMPOTrainer", "GMPOConfig",
           "OnlineDPOTrainer", "OnlineDPOConfig", "A2POTrainer", "A2POConfig", "SDFTTrainer",
           "SDFTConfig", "SDPOTrainer", "SDPOConfig", "IWOPDTrainer", "IWOPDConfig",
           "ClassificationTrainer", "ClassificationConfig", "BEMACallback", "FastTuneError", "FastModel",
           "FastVisionModel", "VisionDataCollator", "UnslothVisionDataCollator",
           "is_bfloat16_supported", "is_bf16_supported", "PatchDPOTrainer", "PatchFastRL", "unsloth_train",
           "UnslothTrainer",
           "UnslothTrainingArguments",
           "get_chat_template", "standardize_sharegpt", "standardize_data_formats", "to_sharegpt",
           "apply_chat_template", "train_on_responses_only"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, _, target = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module), target or name)
    raise AttributeError(f"module 'fasttune' has no attribute '{name}'")
