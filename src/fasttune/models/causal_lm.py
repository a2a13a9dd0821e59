"""`CausalLM`: our decoder (models/decoder.py) as a transformers causal-LM model: its config, the LM head and the loss
(fused chunked cross-entropy, or streamed from host memory with offload_lm_head), generation, PEFT-style adapters,
saving and merging.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from fasttune.constants import IGNORE_INDEX
from fasttune.errors import ConfigError, refuse_unknown
from fasttune.kernels.cross_entropy import chunked_linear_cross_entropy, logits_from_hidden
from fasttune.kernels.streamed_head import streamed_cross_entropy, streamed_logits, streamed_token_logprobs
from fasttune.kernels.token_logprobs import token_logprobs
from fasttune.models.config import ModelConfig
from fasttune.models.kv_cache import KVCache
from fasttune.models.moe import load_balancing_loss
from fasttune.models.host_head import host_head
from fasttune.models.outputs import CausalLMOutput, evaluation_as_transformers
from fasttune.models.decoder import DecoderModel


# Where a family's checkpoints name our top-level modules otherwise (CausalLM.checkpoint_name)
CHECKPOINT_NAMES = {"nemotron_h": (("model.embed_tokens", "model.embeddings"), ("model.norm", "model.norm_f"))}


class CausalLM(PreTrainedModel):
    """Our decoder as a transformers model: `CausalLM(config)` takes the family's transformers config (LlamaConfig,
    Qwen2Config, ...), which stays `model.config`; `model.arch` is fasttune's reading of it (ModelConfig).

    `forward` follows transformers' causal-LM contract (input_ids, attention_mask, position_ids, labels,
    num_items_in_batch, logits_to_keep, use_cache, return_dict), so `transformers.Trainer` and TRL's trainers
    train it as they are; unknown keyword arguments raise TypeError."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True  # transformers.Trainer passes num_items_in_batch: exact gradient accumulation
    _supports_sdpa = True
    _no_split_modules = ["DecoderLayer"]
    has_lm_head = True  # (a sequence classifier has a `score` head instead: models/sequence_classification.py)
    # logits and log-probs from the head's product in fp32 (TRL's cast_lm_head_to_fp32; the weights stay as they are)
    fp32_head = False
    transformers_classes = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"  # the auto mapping that names our transformers twin

    def __init__(self, config: PretrainedConfig):
        if isinstance(config, ModelConfig):
            raise TypeError("CausalLM(config) takes the transformers config of the family (e.g. LlamaConfig); "
                            "ModelConfig.from_hf(config) is derived from it.")
        super().__init__(config)
        self.arch = ModelConfig.from_hf(config)
        self.model = DecoderModel(self.arch)
        self.lm_head = nn.Linear(self.arch.hidden_size, self.arch.vocab_size, bias=False) if self.has_lm_head else None
        if self.arch.tie_embeddings and self.has_lm_head:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loss_type = "ForCausalLM"  # transformers.Trainer counts num_items_in_batch over shifted labels
        self.generation_config = GenerationConfig.from_model_config(config)
        self.lora_settings = None  # set by get_peft_model / an adapter load (models/interface.py)
        self.max_seq_length: int | None = None

    def _get_name(self) -> str:
        """The name of the transformers class this model stands in for (transformers' auto mapping by
        config.model_type, e.g. LlamaForCausalLM, Gemma3ForConditionalGeneration; else our class name).
        transformers' Trainer tells causal LMs by it (with label_smoothing_factor it shifts their labels, as the
        models' own loss does), and print(model) shows it."""
        from transformers.models.auto import modeling_auto

        names = getattr(modeling_auto, self.transformers_classes)
        return names.get(getattr(self.config, "model_type", None)) or type(self).__name__

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the decoder's)."""
        return self.model.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device the decoder runs on."""
        return self.model.final_norm.weight.device

    @property
    def hf_config(self) -> PretrainedConfig:
        """The transformers config (the same object as `model.config`)."""
        return self.config

    @hf_config.setter
    def hf_config(self, value: PretrainedConfig):
        """Replace the transformers config (model.config)."""
        self.config = value

    def train(self, mode: bool = True):
        """nn.Module.train; entering training also frees the KV cache and CUDA graphs generate() keeps between
        calls (models/static_decode.py), so training never holds them."""
        if mode:
            from fasttune.models.static_decode import release_decode_session

            release_decode_session(self)
        return super().train(mode)

    @property
    def gradient_checkpointing(self) -> str | bool:
        """The recompute mode: "auto" | True | False | "offload" (see api.set_gradient_checkpointing)."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: str | bool):
        """Set the recompute mode (validated by api.set_gradient_checkpointing, not here); a recompute mode covers
        every layer again (recompute_layers None)."""
        self.model.gradient_checkpointing = mode
        self.model.recompute_layers = None

    @property
    def recompute_layers(self) -> int | None:
        """With a recompute mode on: how many decoder layers, from the first, are recomputed in backward; the later
        ones keep their activations. None = all (what every explicit mode means; use_gradient_checkpointing="auto"
        picks a count that fills the free GPU memory, train/memory_policy.py)."""
        return self.model.recompute_layers

    @recompute_layers.setter
    def recompute_layers(self, count: int | None):
        """Recompute the first `count` layers only (0 <= count <= layers), or all with None. Raises ConfigError
        for another value."""
        layers = len(self.model.layers)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= layers):
            raise ConfigError(f"recompute_layers={count!r}: give a whole number of layers from 0 to {layers}, or None "
                              f"to recompute every layer.")
        self.model.recompute_layers = count

    @property
    def lean_saves(self) -> bool:
        """Whether the decoder layers that keep their activations (no recompute, or those after recompute_layers)
        rebuild their norm and activation outputs in backward instead of keeping them: ~32% fewer saved values a dense
        layer for one elementwise pass each (kernels/rebuild.py). use_gradient_checkpointing="auto" turns it on
        when memory is the limit; gradients are bitwise the same either way."""
        return self.model.lean_saves

    @lean_saves.setter
    def lean_saves(self, on: bool):
        """Turn lean saves on or off. Raises ConfigError for a value that is not a bool."""
        if not isinstance(on, bool):
            raise ConfigError(f"lean_saves={on!r}: give True or False.")
        self.model.lean_saves = on

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers' flag: True when any recompute mode is on."""
        return bool(self.model.gradient_checkpointing)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options):
        """What transformers' and TRL's trainers call: recompute each layer in backward. An explicit
        "offload" mode set earlier (use_gradient_checkpointing="unsloth") is kept. The options of transformers'
        own implementation, which differ between its versions (gradient_checkpointing_kwargs such as
        use_reentrant, every_n_layers), have no effect: our recompute is always the non-reentrant kind and
        covers every layer."""
        if self.model.gradient_checkpointing != "offload":
            self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        """Turn recompute off (what transformers' and TRL's trainers call)."""
        self.gradient_checkpointing = False

    @property
    def embedding_param_names(self) -> tuple[str, ...]:
        """Trainable parameters that get embedding_learning_rate (embed_tokens / lm_head as modules to save)."""
        names = ("model.embed_tokens.weight", "lm_head.weight")
        return tuple(n for n, p in self.named_parameters() if n in names and p.requires_grad)

    def get_input_embeddings(self) -> nn.Embedding:
        """embed_tokens (vocab, hidden), as transformers' models return it."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        """Replace embed_tokens."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        """lm_head (hidden -> vocab)."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        """Replace lm_head."""
        self.lm_head = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize embed_tokens (and an untied lm_head) to `new_num_tokens` rows (rounded up to
        pad_to_multiple_of), as transformers' method does: for tokens added to the tokenizer the new rows start as
        the mean of the existing ones (see models/vocab.py); a smaller size keeps the first rows (as transformers
        shrinks them, e.g. len(tokenizer) below a vocabulary padded for speed, as Qwen's). Returns the input
        embeddings. Raises ConfigError for mean_resizing=False when growing (only the mean start is implemented)
        and after get_peft_model."""
        from fasttune.models.vocab import drop_token_rows, init_token_rows

        current = self.arch.vocab_size
        if new_num_tokens is None:
            return self.get_input_embeddings()
        if pad_to_multiple_of:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens < current:
            drop_token_rows(self, new_num_tokens)
            return self.get_input_embeddings()
        if not mean_resizing and new_num_tokens > current:
            raise ConfigError("resize_token_embeddings(mean_resizing=False): new rows always start as the mean of "
                              "the existing ones here; leave mean_resizing at True.")
        if new_num_tokens > current:
            init_token_rows(self, list(range(current, new_num_tokens)))
        return self.get_input_embeddings()

    def checkpoint_name(self, name: str) -> str:
        """Our parameter / module name -> transformers' in this family's checkpoints: the same, except where a family
        names the embeddings or the final norm otherwise (CHECKPOINT_NAMES: Nemotron-H's model.embeddings and
        model.norm_f; the loader reads those names into ours, models/loading.py's CHECKPOINT_RENAMES)."""
        for ours, theirs in CHECKPOINT_NAMES.get(self.arch.model_type, ()):
            if name == ours or name.startswith(ours + "."):
                return theirs + name[len(ours):]
        return name

    def get_decoder(self) -> DecoderModel:
        """The backbone (transformers' `model.model`)."""
        return self.model

    def save_pretrained(self, save_directory, tokenizer=None, state_dict=None, is_main_process: bool | None = None,
                        safe_serialization: bool = True, max_shard_size=None, push_to_hub: bool = False, **kwargs):
        """A LoRA model writes its PEFT adapter (adapter_config.json + adapter_model.safetensors); a fully fine-tuned
        model writes a transformers checkpoint. Files already in the folder under other names are kept.

        The keywords transformers' Trainer passes are accepted (state_dict, is_main_process, safe_serialization,
        max_shard_size; only is_main_process has an effect: other ranks write nothing). Called that way (a
        trainer's checkpoint), a LoRA model also writes `model.safetensors` with its trainable tensors under
        this model's parameter names: the file transformers' Trainer reloads on `resume_from_checkpoint` for a
        model that is not a PeftModel. Raises ConfigError for push_to_hub (local files only) or unknown keywords."""
        from fasttune.export.merged import save_merged
        from fasttune.peft.adapter_io import write_trainable_state

        refuse_unknown("save_pretrained", kwargs)
        if push_to_hub:
            raise ConfigError("save_pretrained(push_to_hub=True): fasttune writes local files only; upload the folder "
                              "with `huggingface-cli upload`.")
        if is_main_process is False:
            return None
        lora = getattr(self, "lora_settings", None) is not None
        folder = save_merged(self, save_directory, tokenizer, save_method="lora" if lora else "merged_16bit")
        if lora and is_main_process is not None:
            write_trainable_state(self, folder)
        return folder

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
        """Merged transformers checkpoint (or the adapter, save_method="lora"); see fasttune.export.merged. The
        peer's keywords in SAVE_MERGED_IGNORED (sharding, hub and memory options) have no effect here; any other
        keyword is a ConfigError."""
        from fasttune.export.merged import save_merged

        from fasttune.export.merged import SAVE_MERGED_IGNORED

        refuse_unknown("save_pretrained_merged", kwargs, SAVE_MERGED_IGNORED)
        return save_merged(self, save_directory, tokenizer, save_method=save_method)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """KV-cache generation with transformers-style arguments; see fasttune.generate.generate."""
        from fasttune.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def fast_generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True, tokenizer=None):
        """vLLM's `llm.generate` as Unsloth's `fast_inference=True` models offer it, on fasttune's KV-cache
        generate (fasttune.fast_inference; no vLLM, no CUDA graphs, no continuous batching).

        prompts: str or list[str] of already formatted text. sampling_params: a vLLM SamplingParams (attributes read
        by name) or a dict with n, temperature (0 = greedy), top_p, top_k (-1 or 0 = off), min_p, max_tokens
        (default 16, as vLLM), min_tokens, stop (str or list[str]), stop_token_ids, seed, repetition_penalty,
        ignore_eos, include_stop_str_in_output, skip_special_tokens; None = vLLM's defaults. lora_request: from
        `self.load_lora(path)`; that adapter's weights are used for this call only. use_tqdm: accepted, no effect.
        tokenizer: default the one from_pretrained loaded. Returns list[RequestOutput] (one per prompt; `.outputs`
        holds n CompletionOutput with .text, .token_ids, .finish_reason "stop" or "length").
        Raises ConfigError for unknown or unsupported sampling fields, invalid values, or an adapter that does not
        fit this model's LoRA layers."""
        from fasttune.fast_inference import fast_generate

        return fast_generate(self, prompts, sampling_params, lora_request, use_tqdm, tokenizer)

    def save_lora(self, save_directory):
        """Write the current LoRA adapter to `save_directory` (PEFT format: adapter_config.json +
        adapter_model.safetensors); returns the folder as a Path. Raises ConfigError without an adapter."""
        from fasttune.fast_inference import save_lora

        return save_lora(self, save_directory)

    def load_lora(self, save_directory, load_tensors: bool = True):
        """Read a saved adapter folder into a handle for `fast_generate(..., lora_request=...)`; the model itself is
        not changed. Raises ModelLoadError for a missing or invalid adapter."""
        from fasttune.fast_inference import load_lora

        return load_lora(self, save_directory, load_tensors)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="q8_0", **kwargs):
        """A llama.cpp / Ollama GGUF file (LoRA merged in) plus a Modelfile beside it; see fasttune.export.gguf."""
        from fasttune.export.gguf import save_gguf

        return save_gguf(self, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        """lm_head shares embed_tokens' weight when the config ties them (transformers' signature)."""
        if self.arch.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, inputs_embeds=None,
                      cache: KVCache | None = None, segment_ids=None) -> torch.Tensor:
        """(B, T, H) final hidden state; see DecoderModel.forward."""
        return self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                          segment_ids=segment_ids).last_hidden_state

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden as the LM head takes it: divided by Granite's logits_scaling, since logits / s = (hidden / s) W^T
        (the head has no bias), so every head path (fused cross-entropy, log-probs, streamed) divides alike."""
        s = self.arch.logits_scaling
        return hidden if s is None else hidden / s

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., vocab) in the hidden dtype (fp32 with fp32_head), Gemma 2's final softcap
        applied."""
        hidden = self.head_input(hidden)
        host = host_head(self)
        if host is not None:  # offload_lm_head: streamed from host memory in tiles
            return streamed_logits(hidden, host, self.arch.final_logit_softcap)
        return logits_from_hidden(hidden, self.lm_head.weight, self.arch.final_logit_softcap, self.fp32_head)

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                       entropy: bool = False, extras: torch.Tensor | None = None):
        """log p(labels | hidden) through the LM head, chunked so the (N x vocab) logits never exist at once:
        hidden (N, H), labels (N,) int64 -> (N,) fp32, with Gemma 2's final softcap and the logits divided by
        `temperature`; entropy=True: (log-probs, entropies (N,) fp32 of the same distributions); extras (N, 3) fp32 gets
        each token's kernels.token_logprobs.EXTRAS (no gradient). A head in host memory (offload_lm_head) is streamed
        in tiles."""
        hidden = self.head_input(hidden)
        host = host_head(self)
        if host is not None:
            return streamed_token_logprobs(hidden, host, labels, self.arch.final_logit_softcap, temperature, entropy,
                                           extras)
        return token_logprobs(hidden, self.lm_head.weight, labels, self.arch.final_logit_softcap, temperature,
                              entropy=entropy, fp32=self.fp32_head, extras=extras)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: KVCache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, num_items_in_batch=None, return_logits: bool | None = None,
                segment_ids=None, output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                cache_position=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                seq_idx=None, output_router_logits: bool | None = None, image_blocks=None, deepstack=None,
                per_layer_ids=None, return_token_stats: bool = False, dft: bool = False, smoothing: float = 0.0,
                cross=None, backbone: bool = False):
        """input_ids (B, T) int64 -> CausalLMOutput (transformers' ModelOutput; a tuple with return_dict=False).

        labels (B, T): -100 = ignored; loss = summed cross-entropy of label[t+1] given tokens <= t, divided by
        `num_items_in_batch` (transformers.Trainer's count over the whole accumulated batch) or by this batch's
        target count. With labels the logits are not formed (chunked fused cross-entropy) unless return_logits.
        `past_key_values`: a KVCache to read and extend (attention_mask then covers cached + new positions);
        `logits_to_keep=n` computes logits for the last n positions only; `segment_ids`: document ids of packed
        rows (with per-document `position_ids`), see data/packing.py; padding-free rows (position_ids restarting,
        or cu_seq_lens_q/k) as in DecoderModel.forward.

        MoE models: `output_router_logits` (default: config.output_router_logits) adds `aux_loss`, the
        load-balancing loss over the sparse layers (models/moe.py), and `router_logits`; with labels, loss gets
        `config.router_aux_loss_coef * aux_loss` added, as transformers' Qwen3MoeForCausalLM / MixtralForCausalLM
        do (per forward pass: with gradient accumulation each micro-batch adds its own, as in transformers'
        Trainer). loss_sum stays the cross-entropy alone.

        return_token_stats (with labels): `token_stats` (2,) fp32 = [sum of the target tokens' entropies, count of
        targets that are their row's first argmax], from the loss's own chunked pass (TRL's SFT `entropy` and
        `mean_token_accuracy` over target_count), no gradient. dft (Dynamic Fine-Tuning, TRL's SFT loss_type="dft"):
        each target's cross-entropy weighted by its probability, detached (not with offload_lm_head).
        smoothing e (transformers' label_smoothing_factor): each target's loss (1 - e) x cross-entropy + e x the
        mean of -log p over the vocabulary, as transformers' LabelSmoother (not with offload_lm_head). (No keyword
        here may contain "label" but `labels`: transformers' Trainer takes every such one for a label column.)
        cross: Llama 3.2 Vision's image inputs to its cross-attention layers (models/vision.py builds them).
        backbone=True: the decoder's output (BaseModelOutput: last_hidden_state (B, T, H), router_logits), without the
        LM head: what a caller that applies the head itself reads (distillation's divergence), through this module's
        forward so that FSDP gathers the root's shards (embeddings, LM head) and runs its hooks."""
        if output_router_logits is None:
            output_router_logits = bool(getattr(self.config, "output_router_logits", False))
        output_router_logits = output_router_logits and self.arch.num_experts > 0 and past_key_values is None
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         segment_ids, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, cu_seq_lens_q=cu_seq_lens_q,
                         cu_seq_lens_k=cu_seq_lens_k, seq_idx=seq_idx, output_router_logits=output_router_logits,
                         image_blocks=image_blocks, deepstack=deepstack, per_layer_ids=per_layer_ids, cross=cross,
                         last_only=past_key_values is not None and logits_to_keep == 1 and labels is None)
        if backbone:
            return out
        hidden = out.last_hidden_state
        router_logits = out.router_logits if output_router_logits and out.router_logits else None
        logits = loss = loss_sum = count = stats = None
        hf_eval = evaluation_as_transformers(self, labels, return_logits)
        if labels is None or return_logits or hf_eval:
            logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1).to(hidden.device)
            flat, host = self.head_input(hidden[:, :-1].reshape(-1, hidden.shape[-1])), host_head(self)
            stats = torch.zeros(2, dtype=torch.float32, device=flat.device) if return_token_stats else None
            if host is not None:  # offload_lm_head: one online-softmax pass over the streamed head
                if dft or smoothing:
                    what = "loss_type='dft'" if dft else "label_smoothing_factor"
                    raise ConfigError(f"{what} is not implemented with offload_lm_head=True; load the model "
                                      f"without offload_lm_head, or train without it.")
                loss_sum = streamed_cross_entropy(flat, host, shifted, self.arch.final_logit_softcap, stats)
            else:
                loss_sum = chunked_linear_cross_entropy(flat, self.lm_head.weight, shifted,
                                                        self.arch.final_logit_softcap, stats=stats, dft=dft,
                                                        label_smoothing=smoothing)
            count = (shifted != IGNORE_INDEX).sum()
            loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
        # The KVCache is not returned: the caller passed it in and holds it (its field name differs across
        # transformers versions).
        aux = None
        if router_logits is not None:
            aux = load_balancing_loss(router_logits, self.arch.num_experts, self.arch.num_experts_per_tok,
                                      attention_mask)
            if loss is not None:
                loss = loss + float(getattr(self.config, "router_aux_loss_coef", 0.0) or 0.0) * aux.to(loss.device)
        if hf_eval:
            loss_sum = count = stats = None
        out = CausalLMOutput(loss=loss, logits=logits, loss_sum=loss_sum, target_count=count, aux_loss=aux,
                             router_logits=router_logits, token_stats=stats)
        return out if return_dict is not False else out.to_tuple()
