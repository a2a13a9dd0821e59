"""The interface every fasttune model implements: our decoder (models/causal_lm.py `CausalLM`) and the
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
    """The members every fasttune model has (our CausalLM and FallbackModel); a runtime-checkable Protocol, so
    isinstance(model, FineTunableLM) checks them by name."""

    config: Any  # transformers.PretrainedConfig
    arch: Any  # ModelConfig | FallbackConfig
    name_or_path: str | None  # where the base came from (written into adapter_config.json)
    max_seq_length: int | None  # from_pretrained's max_seq_length
    lora_settings: Any  # peft.lora.LoraSettings once get_peft_model ran, else None
    gradient_checkpointing: str | bool  # "auto" | True | False | "offload"

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (e.g. torch.bfloat16)."""

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, logits_to_keep: int = 0,
                num_items_in_batch=None, return_logits=None):
        """transformers' causal-LM forward: input_ids (B, T) int64 -> CausalLMOutput (models/outputs.py; a tuple with
        return_dict=False). With labels (B, T, -100 = ignored) `loss` is the summed cross-entropy of the shifted labels
        divided by num_items_in_batch (or this batch's target count) and `loss_sum`, `target_count` are set; logits are
        then only formed with return_logits. logits_to_keep=n keeps the last n positions' logits."""

    def get_input_embeddings(self) -> torch.nn.Module:
        """The token embedding module (vocab_size, hidden_size)."""

    def get_output_embeddings(self) -> torch.nn.Module:
        """The output head (hidden_size -> vocab_size; tied to the input embeddings when tie_embeddings)."""

    def generate(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """transformers-style generate: input_ids (B, T) int64 -> (B * n, T + new) int64 token ids; see
        fasttune.generate.generate for the arguments and the ConfigError it raises."""

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        """Write the PEFT adapter (a LoRA model) or a transformers checkpoint (a fully fine-tuned one) to
        save_directory, with the tokenizer when given. Raises ConfigError for unknown keywords."""

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
        """Write a transformers checkpoint with the LoRA merged in (save_method "merged_16bit" / "merged_4bit" /
        "merged_fp8") or the adapter ("lora"); see fasttune.export.merged. Raises ConfigError for an unknown
        save_method or keyword."""

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="q8_0", **kwargs):
        """Write a llama.cpp GGUF file (LoRA merged in) quantised as quantization_method, and an Ollama Modelfile; see
        fasttune.export.gguf.save_gguf. Raises ConfigError for an unknown method or a model it cannot export (the
        transformers+PEFT fallback always)."""
