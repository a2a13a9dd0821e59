"""fasttune: fine-tune LLMs (LoRA, full) fast and lean, with exports the ecosystem loads."""
from fasttune.api import FastLanguageModel
from fasttune.errors import FastTuneError
from fasttune.train.config import SFTConfig
from fasttune.train.objectives.sft import SFTTrainer

__all__ = ["FastLanguageModel", "SFTTrainer", "SFTConfig", "FastTuneError"]
__version__ = "0.1.0"
