"""The interface every fasttune model implements: our decoder (models/decoder.py `CausalLM`) and the
transformers+PEFT fallback (models/fallback.py `FallbackModel`). The trainers, objectives, exporters and CLI use
these members and nothing else, so either model serves every path.

`config` is the transformers config of the family (what transformers' and TRL's trainers read); `arch` is
fasttune's reading of it (`ModelConfig` for our decoder, `FallbackConfig` for the fallback): model_type,
vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, tie_embeddings, pad/bos/eos ids.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class FineTunableLM(Protocol):
    config: Any  # transformers.PretrainedConfig
    arch: Any  # ModelConfig | FallbackConfig
    name_or_path: str | None  # where the base came from (written into adapter_config.json)
    max_seq_length: int | None  # from_pretrained's max_seq_length
    lora_settings: Any  # peft.lora.LoraSettings once get_peft_model ran, else None
    gradient_checkpointing: str | bool  # "auto" | True | False | "offload"

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, logits_to_keep: int = 0,
                num_items_in_batch=None, return_logits=None): ...

    def get_input_embeddings(self) -> torch.nn.Module: ...

    def get_output_embeddings(self) -> torch.nn.Module: ...

    def generate(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor: ...

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs): ...

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs): ...

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="q8_0", **kwargs): ...
