"""`from fasttune.trainer import ...`: the names scripts import from Unsloth's `unsloth.trainer`, so that switching is
an import change: UnslothVisionDataCollator (our VisionDataCollator), UnslothTrainer and UnslothTrainingArguments
(our SFTTrainer and SFTConfig)."""
from fasttune.data.vision_rows import VisionDataCollator as UnslothVisionDataCollator
from fasttune.train.config import SFTConfig as UnslothTrainingArguments
from fasttune.train.objectives.sft import SFTTrainer as UnslothTrainer

__all__ = ["UnslothVisionDataCollator", "UnslothTrainer", "UnslothTrainingArguments"]
