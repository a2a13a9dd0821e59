"""The transformers+PEFT path for architectures outside our decoder (and for any model with fast=False / --no-fast).

`FallbackModel` wraps `AutoModelForCausalLM` (+ `peft.get_peft_model` once LoRA is added) behind the interface
the rest of fasttune uses for our `CausalLM`: `.config` (the transformers config), `.arch` with the fields the
trainer and checkpoints read,
`.device`, `.dtype`, `.lora_settings`, `.name_or_path`, `.hf_config`, `gradient_checkpointing`, and a forward that
returns `loss` (= summed target-token cross-entropy / num_items_in_batch), `loss_sum`, `num_targets`, `logits`, so
the one trainer core (batching, gradient accumulation, checkpoints) runs it unchanged. Adapters are PEFT's own.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fasttune.atomic import atomic_folder
from fasttune.constants import IGNORE_INDEX
from fasttune.errors import ConfigError, ModelLoadError, refuse_unknown
from fasttune.kernels.cross_entropy import cross_entropy_sum, token_stats
from fasttune.models.config import SUPPORTED_FAMILIES
from fasttune.models.outputs import CausalLMOutput, evaluation_as_transformers
from fasttune.peft.lora import LoraSettings, validate_settings

ADAPTER = "default"  # PEFT's adapter name
# Keyword arguments of transformers' causal-LM forward that FallbackModel.forward passes on.
TRANSFORMERS_FORWARD_KWARGS = ("use_cache", "past_key_values", "cache_position", "token_type_ids",
                               "output_attentions", "output_hidden_states", "cu_seq_lens_q", "cu_seq_lens_k",
                               "max_length_q", "max_length_k", "seq_idx", "output_router_logits")


class FallbackWarning(UserWarning):
    """Emitted once per load: the model runs through transformers+PEFT at standard speed."""


@dataclass
class FallbackConfig:
    """What the trainer, checkpoints and CLI read from `model.arch`, taken from the transformers config."""
    model_type: str
    vocab_size: int
    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    intermediate_size: int | None
    tie_embeddings: bool
    pad_token_id: Any = None
    bos_token_id: Any = None
    eos_token_id: Any = None
    extra_embeddings: int = 0  # (embedding rows past vocab_size: none here, vocab_size counts every row)

    @property
    def head_dim(self) -> int | None:
        """hidden_size // num_heads, or None when either is unknown."""
        return self.hidden_size // self.num_heads if self.hidden_size and self.num_heads else None

    @classmethod
    def from_hf(cls, hf_model) -> "FallbackConfig":
        """Read from a loaded transformers model (not a config): vocab_size is the input embedding's row count,
        tie_embeddings whether the output head shares its weight; intermediate_size falls back to n_inner, ffn_dim,
        then 4 * hidden_size."""
        c = hf_model.config
        get = lambda *names: next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)  # noqa: E731
        heads = get("num_attention_heads")
        inp, out = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
        return cls(model_type=c.model_type, vocab_size=inp.weight.shape[0], hidden_size=get("hidden_size"),
                   num_layers=get("num_hidden_layers"), num_heads=heads,
                   num_kv_heads=get("num_key_value_heads") or heads,
                   intermediate_size=get("intermediate_size", "n_inner", "ffn_dim") or 4 * (get("hidden_size") or 0),
                   tie_embeddings=out is not None and out.weight is inp.weight,
                   pad_token_id=get("pad_token_id"), bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"))


def _mark_embedded_base(weights_file: Path, name_or_path) -> None:
    """Add the embedded-base marker (defaults.portable_base) to an adapter file PEFT wrote."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fasttune.defaults import portable_base

    marker = portable_base(name_or_path)[1]
    if not marker or not weights_file.exists():
        return
    with safe_open(str(weights_file), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    save_file(tensors, str(weights_file), metadata={**metadata, **marker})


def load_fallback(path: Path, dtype: torch.dtype, device, model_type: str, forced: bool, hf_config=None,
                  gguf_file: str | None = None, quant: str | None = None,
                  vision_families: tuple = ()) -> "FallbackModel":
    """AutoModelForCausalLM from local files only (no remote code), frozen, in `dtype` on `device`; quant="nf4" /
    "int8" quantises through transformers' bitsandbytes integration ("fp8" is a ConfigError). vision_families: the
    vision-language families fasttune runs, named when a vision-language checkpoint of another one cannot load here."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "local_files_only": True, "trust_remote_code": False}
    if quant == "fp8":
        raise ConfigError(f"'{model_type}' runs through transformers + PEFT (not fasttune's decoder), where "
                          f"load_in_fp8 / --quantization fp8 is not supported; load it with load_in_4bit=True, "
                          f"load_in_8bit=True or in 16 bits.")
    if quant is not None:
        kwargs.update(quantization_config=_bnb_config(quant, dtype, model_type), device_map={"": str(device)})
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    elif hf_config is not None:
        kwargs["config"] = hf_config
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
        cause = f"({type(e).__name__}: {_one_line(e)})"
        if forced and model_type in SUPPORTED_FAMILIES:  # e.g. a gpt-oss GGUF, which transformers cannot read
            raise ModelLoadError(
                f"fast=False / --no-fast asks transformers to load '{path}', and it cannot {cause}. fasttune's own "
                f"decoder reads this '{model_type}' model: load it without fast=False / --no-fast.") from None
        if getattr(hf_config, "vision_config", None) is not None:  # a vision-language family we do not run
            raise ModelLoadError(
                f"'{path}' is a {model_type} vision-language model, which fasttune does not run yet; its "
                f"vision-language families are {', '.join(sorted(vision_families))} (README, \"Vision-language "
                f"models\"). transformers cannot load it as a causal language model either {cause}.") from None
        raise ModelLoadError(
            f"Architecture '{model_type}' is not supported by fasttune's fast decoder (supported: "
            f"{', '.join(SUPPORTED_FAMILIES)}), and transformers cannot load '{path}' as a causal language model "
            f"either {cause}. Use a decoder-only model that "
            f"transformers' AutoModelForCausalLM loads without remote code.") from None
    why = ("fast=False / --no-fast was given" if forced else
           f"'{model_type}' is not supported by fasttune's fast decoder (supported: {', '.join(SUPPORTED_FAMILIES)})")
    if not forced and gguf_file is not None and model_type in SUPPORTED_FAMILIES:  # MoE families from GGUF
        why = f"fasttune's fast decoder does not read '{model_type}' GGUF files yet (its safetensors checkpoints it does)"
    warnings.warn(f"Architecture '{model_type}': {why}, so it is loaded through transformers + PEFT and trains at "
                  f"standard speed (same results, none of fasttune's speed-ups).", FallbackWarning, stacklevel=4)
    towers = [name for name in ("vision_config", "audio_config") if getattr(hf_model.config, name, None) is not None
              or getattr(hf_config, name, None) is not None]
    if towers and not any(part in name for name, _ in hf_model.named_modules()
                          for part in ("vision", "visual", "audio", "multi_modal_projector")):
        # e.g. Llama 4: AutoModelForCausalLM's class holds the language model only
        warnings.warn(f"'{path}' is a {model_type} checkpoint with {' and '.join(t[:-7] for t in towers)} "
                      f"tower(s), but transformers' {type(hf_model).__name__} (what AutoModelForCausalLM loads) holds "
                      f"its language model only: the towers are not loaded, training sees text only, and a merged "
                      f"save holds the language model alone.", FallbackWarning, stacklevel=4)
    hf_model.requires_grad_(False)
    return FallbackModel((hf_model if quant else hf_model.to(device)).eval(), dtype)


def _bnb_config(quant: str, dtype: torch.dtype, model_type: str):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(f"'{model_type}' runs through transformers, whose 4/8-bit loading needs bitsandbytes: "
                          f"`pip install bitsandbytes`, or load it in 16 bits.") from None
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


class FallbackModel(nn.Module):
    """A transformers AutoModelForCausalLM (a PeftModel around it once LoRA is added) behind the interface of our
    CausalLM (models/interface.py); built by load_fallback. Attributes it lacks are read off the wrapped model."""

    def __init__(self, hf_model, dtype: torch.dtype):
        super().__init__()
        self.hf_model = hf_model  # a transformers PreTrainedModel; a PeftModel around it once LoRA is added
        self.arch = FallbackConfig.from_hf(hf_model)
        self.config = hf_model.config  # the transformers config, as on our decoder
        self.hf_config = hf_model.config
        self._dtype, self._gc = dtype, False
        names = {id(m): n for n, m in hf_model.named_modules()}
        out = hf_model.get_output_embeddings()
        # Module paths of the embeddings: "embed_tokens" / "lm_head" in fasttune's vocabulary map onto these.
        self._embed_path = names[id(hf_model.get_input_embeddings())]
        self._head_path = names.get(id(out)) if out is not None else None
        self.name_or_path, self.lora_settings, self.max_seq_length = None, None, None

    # --- the interface of our CausalLM -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model was loaded in."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of the input embeddings."""
        return self.transformers_model.get_input_embeddings().weight.device

    @property
    def transformers_model(self):
        """The transformers causal-LM model (inside the PeftModel when LoRA was added)."""
        return self.hf_model.get_base_model() if self.lora_settings is not None else self.hf_model

    @property
    def base_model(self):
        """The transformers backbone (what `model.base_model` is on a transformers model): TRL's fused LM head
        runs it and then our output embeddings."""
        return self.transformers_model.base_model

    def _get_name(self) -> str:
        """The wrapped transformers model's class name (e.g. Phi3ForCausalLM): transformers' Trainer tells causal LMs
        by it (with label_smoothing_factor it shifts their labels), and print(model) shows it."""
        return self.transformers_model._get_name()

    def get_input_embeddings(self) -> nn.Module:
        """The transformers model's token embedding module."""
        return self.transformers_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        """The transformers model's output head (None for a model without one)."""
        return self.transformers_model.get_output_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options):
        """transformers' and TRL's trainers call this: recompute layers (an explicit "offload" choice is kept)."""
        if self._gc != "offload":
            self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        """Stop recomputing layers in backward."""
        self.gradient_checkpointing = False

    def __getattr__(self, name: str):
        # Anything else a transformers trainer reads off a model (generation_config, add_model_tags,
        # enable_input_require_grads, ...) is the wrapped transformers model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "hf_model" not in self._modules:
                raise
            return getattr(self._modules["hf_model"], name)

    @property
    def gradient_checkpointing(self):
        """The mode last set: "auto", True, False or "offload" (False when the transformers model does not support
        checkpointing)."""
        return self._gc

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode):
        """Apply `mode` to the transformers model (non-reentrant); "auto" recomputes on CUDA only, "offload" also
        offloads activations on transformers versions with activation_checkpointing_enable (older ones recompute as for
        True)."""
        base = self.transformers_model
        # "auto" is resolved by the trainer from the batch shape; until then recompute on GPUs, as our decoder does.
        on = mode if mode != "auto" else self.device.type == "cuda"
        if not base.supports_gradient_checkpointing:
            mode = False
        elif hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x names (with offload)
            if on:
                base.activation_checkpointing_enable({"use_reentrant": False}, offload=mode == "offload")
            else:
                base.activation_checkpointing_disable()
        elif on:  # older transformers: no offload, "offload" recomputes like True
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
        self._gc = mode

    @property
    def embedding_param_names(self) -> tuple[str, ...]:
        """Parameters that get embedding_learning_rate: the embeddings and lm_head (or their trainable copies)."""
        paths = [f".{p}." for p in (self._embed_path, self._head_path) if p]
        return tuple(n for n, p in self.named_parameters() if p.requires_grad and any(s in f".{n}" for s in paths))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
                return_logits: bool | None = None, inputs_embeds=None, logits_to_keep: int = 0,
                return_dict: bool | None = None, return_token_stats: bool = False, dft: bool = False,
                smoothing: float = 0.0, **kwargs):
        """The loss is computed here from the logits (summed cross-entropy), as our decoder does, so gradient
        accumulation divides by the target tokens of the whole accumulated batch. return_token_stats (with labels):
        `token_stats` as CausalLM.forward gives them (TRL's SFT entropy and accuracy), from these logits; dft and
        smoothing as in CausalLM.forward. Other keyword
        arguments go to the transformers model when they are among TRANSFORMERS_FORWARD_KWARGS; any other one is a
        ConfigError."""
        refuse_unknown("forward", kwargs, TRANSFORMERS_FORWARD_KWARGS)
        if kwargs.get("past_key_values") is not None:  # fasttune.generate's KVCache belongs to our decoder
            raise ConfigError(f"fasttune's KV-cache generation runs on its own decoder; this "
                              f"'{self.arch.model_type}' model runs through transformers: use model.generate(...) "
                              f"(transformers' generate) instead.")
        kwargs.pop("use_cache", None)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hf_out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               use_cache=False, **kwargs)
        logits, aux = hf_out.logits, getattr(hf_out, "aux_loss", None)  # (MoE with output_router_logits)
        loss = loss_sum = count = kept = stats = None
        hf_eval = evaluation_as_transformers(self, labels, return_logits)
        if labels is None or return_logits or hf_eval:
            kept = logits[:, -logits_to_keep:] if logits_to_keep else logits
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1).to(logits.device)
            loss_sum = cross_entropy_sum(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, dft, smoothing)
            count = (shifted != IGNORE_INDEX).sum()
            loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
            if aux is not None:  # the load-balancing loss, weighted as transformers' MoE models add it
                loss = loss + float(getattr(self.config, "router_aux_loss_coef", 0.0) or 0.0) * aux.to(loss.device)
            if return_token_stats:
                stats = token_stats(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted)
        if hf_eval:
            loss_sum = count = stats = None
        out = CausalLMOutput(loss=loss, logits=kept, loss_sum=loss_sum, target_count=count, token_stats=stats,
                             aux_loss=aux)
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """transformers' generate() on the wrapped model, taking what fasttune.generate.generate takes and refusing
        what it refuses (an unknown or misspelt argument, num_beams > 1, penalty_alpha, assistant_model, ...: the
        same ConfigError), with its defaults: 32 new tokens when no length is set, stopped rows padded with the
        first stop id. `seed` seeds torch's global generator. input_ids (B, T) int64 -> (B * n, T + new) int64, or
        transformers' output object with return_dict_in_generate=True."""
        from fasttune.generate_args import length_and_pad_defaults, merged_options, prompt_argument, resolve

        seed = kwargs.pop("seed", None)
        input_ids, attention_mask = prompt_argument(input_ids, attention_mask, kwargs)
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        options = merged_options(self.hf_model.generation_config, kwargs.get("generation_config"), kwargs)
        extra = length_and_pad_defaults(options, resolve(options, input_ids.shape[1]))
        if kwargs.get("generation_config") is not None and extra:  # kept in the config object: no mixing warning
            kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
            for name, value in extra.items():
                setattr(kwargs["generation_config"], name, value)
        else:
            kwargs.update(extra)
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.as_tensor(attention_mask, device=self.device)
        if seed is not None:
            torch.manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            return self.hf_model.generate(input_ids=input_ids, **kwargs)
        finally:
            self.train(was_training)

    def fast_generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True, tokenizer=None):
        """vLLM-shaped generation (see CausalLM.fast_generate) through transformers' generate. `seed` seeds torch's
        global generator. Raises ConfigError for lora_request (adapter swapping is implemented for fasttune's
        decoder only) and for what CausalLM.fast_generate refuses."""
        from fasttune.fast_inference import fast_generate

        if lora_request is not None:
            raise ConfigError(f"fast_generate(lora_request=...) swaps adapters on fasttune's own decoder only; this "
                              f"'{self.arch.model_type}' model runs through transformers + PEFT. Attach the adapter "
                              f"with fasttune.api.attach_adapter(model, tokenizer, folder) instead.")
        return fast_generate(self, prompts, sampling_params, None, use_tqdm, tokenizer)

    def save_lora(self, save_directory):
        """Write the current LoRA adapter to `save_directory` (PEFT format, as save_pretrained); returns the folder as
        a Path. Raises ConfigError without an adapter."""
        if self.lora_settings is None:
            raise ConfigError("This model has no LoRA adapter to save; call FastLanguageModel.get_peft_model first.")
        self.save_pretrained(save_directory)
        return Path(save_directory)

    def load_lora(self, save_directory, load_tensors: bool = True):
        """Refused: see fast_generate (ConfigError)."""
        raise ConfigError(f"load_lora / fast_generate(lora_request=...) work on fasttune's own decoder only; this "
                          f"'{self.arch.model_type}' model runs through transformers + PEFT.")

    def sample_text(self, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy reply to `prompt` as a user turn (fasttune.generate.generate_text for this model)."""
        from fasttune.generate import chat_prompt_ids, stop_token_ids

        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        stops = stop_token_ids(tokenizer, self)
        out = self.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=stops)[0, len(ids):]
        new = []
        for t in out.tolist():
            if t in stops:
                break
            new.append(t)
        return tokenizer.decode(new, skip_special_tokens=True)

    # --- LoRA through PEFT --------------------------------------------------------------------------------------
    def add_lora(self, settings: LoraSettings, seed: int | None, targets_given: bool):
        """PEFT LoRA on the given targets (default: every linear layer but the output head). A is re-initialised
        from `seed` in module order, exactly as our LoRA does, so both paths start from the same adapter."""
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from transformers.pytorch_utils import Conv1D

        validate_settings(settings)
        base = self.hf_model
        out_emb = base.get_output_embeddings()
        linears = {n: m for n, m in base.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not out_emb}
        if targets_given:
            targets = settings.target_modules
        else:
            targets = sorted({n.rsplit(".", 1)[-1] for n in linears})
        save = [self._leaf(m) for m in settings.modules_to_save]
        conv = any(isinstance(m, Conv1D) for n, m in linears.items() if n.rsplit(".", 1)[-1] in targets)
        cfg = LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                         target_modules=targets, use_rslora=settings.use_rslora, modules_to_save=save or None,
                         bias=settings.bias, fan_in_fan_out=conv, task_type="CAUSAL_LM",
                         target_parameters=settings.target_parameters or None, use_dora=settings.use_dora)
        rng = torch.random.get_rng_state()
        try:
            with _quiet_peft():
                peft_model = get_peft_model(base, cfg)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                for m in peft_model.modules():
                    if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
                        nn.init.kaiming_uniform_(m.lora_A[ADAPTER].weight, a=math.sqrt(5))
                        nn.init.zeros_(m.lora_B[ADAPTER].weight)
        except ValueError as e:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"PEFT cannot add LoRA to this '{self.arch.model_type}' model with target_modules="
                              f"{settings.target_modules!r}: {e}. Its linear layers are: {names}.") from None
        finally:
            torch.random.set_rng_state(rng)
        self._wrap(peft_model, settings, targets)

    def load_adapter(self, folder: Path) -> LoraSettings:
        """A PEFT adapter folder onto this base, trainable (the same trainable set as when it was saved)."""
        from peft import PeftModel

        from fasttune.file_readers import check_safetensors
        from fasttune.peft.adapter_io import (ADAPTER_FIX, WEIGHTS_NAME, read_adapter_config,
                                              settings_from_peft_config)

        settings = settings_from_peft_config(read_adapter_config(folder))
        if (Path(folder) / WEIGHTS_NAME).is_file():  # a damaged file is named, not reported as a mismatch
            check_safetensors(Path(folder) / WEIGHTS_NAME, fix=ADAPTER_FIX)
        canonical = {self._leaf(m): m for m in ("embed_tokens", "lm_head")}
        settings.modules_to_save = [canonical.get(m, m) for m in settings.modules_to_save]
        try:
            with _quiet_peft():
                peft_model = PeftModel.from_pretrained(self.hf_model, str(folder), is_trainable=True)
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"Adapter {folder} does not fit this '{self.arch.model_type}' base: "
                                 f"{_one_line(e)}. Load it onto the base it was trained from.") from None
        targets = settings.target_modules
        self._wrap(peft_model, settings, sorted({t.rsplit(".", 1)[-1] for t in targets})
                   if isinstance(targets, list) else targets)
        return settings

    def _wrap(self, peft_model, settings: LoraSettings, targets):
        from fasttune.defaults import portable_base

        peft_model.peft_config[ADAPTER].base_model_name_or_path = portable_base(self.name_or_path)[0]
        settings.target_modules = targets
        self.hf_model, self.lora_settings = peft_model, settings
        if settings.modules_to_save and self.arch.tie_embeddings:
            self.arch.tie_embeddings = False  # PEFT trains separate copies, which unties them (as our LoRA does)
        self.gradient_checkpointing = self._gc  # re-apply on the model PEFT returned

    def _leaf(self, name: str) -> str:
        """fasttune's module names (embed_tokens, lm_head) -> this architecture's (e.g. GPT-2: wte, lm_head)."""
        path = {"embed_tokens": self._embed_path, "lm_head": self._head_path}.get(name)
        if path is None:
            raise ConfigError(f"modules_to_save={name!r}: choose from ['embed_tokens', 'lm_head'].")
        return path.rsplit(".", 1)[-1]

    # --- saving ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder, tokenizer=None, state_dict=None, is_main_process: bool | None = None,
                        safe_serialization: bool = True, max_shard_size=None, **kwargs):
        """A LoRA model writes its PEFT adapter; a fully fine-tuned one a transformers checkpoint. transformers'
        Trainer's keywords are accepted (only is_main_process=False has an effect: nothing is written); any
        other keyword is a ConfigError."""
        refuse_unknown("save_pretrained", kwargs)
        if is_main_process is False:
            return None
        if self.lora_settings is None:
            return self.save_pretrained_merged(folder, tokenizer)
        with atomic_folder(Path(folder), "the adapter") as tmp:
            self.hf_model.save_pretrained(str(tmp), save_embedding_layers=False)
            _mark_embedded_base(tmp / "adapter_model.safetensors", self.name_or_path)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(folder)

    def save_pretrained_merged(self, folder, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
        """A transformers checkpoint with any LoRA deltas added (merged_peft_state_dict, in the model's dtype) and
        tied embeddings as `arch.tie_embeddings` says, plus the tokenizer when given; save_method="lora" writes the
        adapter (save_pretrained) instead. Returns the folder as a Path; written atomically. Raises ConfigError for a
        save_method outside SAVE_METHODS, the quantised ones ("merged_4bit", "merged_fp8": fasttune's decoder writes
        them, the fallback does not), or a keyword outside SAVE_MERGED_IGNORED."""
        from fasttune.export.merged import SAVE_MERGED_IGNORED, save_method_name

        refuse_unknown("save_pretrained_merged", kwargs, SAVE_MERGED_IGNORED)
        save_method = save_method_name(save_method)
        if save_method in ("merged_4bit", "merged_fp8"):  # (it wrote 16-bit weights for them, silently)
            raise ConfigError(f"save_method='{save_method}' is not implemented for models on the transformers "
                              f"fallback ({self.arch.model_type}); save 'merged_16bit' and quantise it when loading "
                              f"(load_in_4bit=True / load_in_fp8=True).")
        if save_method == "lora":
            return self.save_pretrained(folder, tokenizer)
        base = self.transformers_model
        with atomic_folder(Path(folder), "the merged model") as tmp:
            state = merged_peft_state_dict(self.hf_model, self.dtype) if self.lora_settings is not None else None
            base.config.tie_word_embeddings = self.arch.tie_embeddings
            base.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(folder)

    def save_pretrained_gguf(self, *args, **kwargs):
        """Refused: raises ConfigError (GGUF export runs on fasttune's own decoder only; convert a merged model with
        llama.cpp's convert_hf_to_gguf.py)."""
        raise ConfigError(f"GGUF export is not available for '{self.arch.model_type}' models on the "
                          f"transformers+PEFT path; save a merged model (save_pretrained_merged) and convert it with "
                          f"llama.cpp's convert_hf_to_gguf.py.")


@contextmanager
def _quiet_peft():
    """PEFT's notices that do not apply here: transformers' checkpointing rename, and tied embeddings in
    modules_to_save (we untie them on purpose, as our own LoRA does, and save merged models untied)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        yield


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def merged_peft_state_dict(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's tensors with each LoRA delta added (in fp32) and modules_to_save copies in place of the
    originals, under the base model's own key names. The live model is left unchanged."""
    base = peft_model.get_base_model()
    deltas = {n: m.get_delta_weight(ADAPTER) for n, m in base.named_modules()
              if hasattr(m, "get_delta_weight") and ADAPTER in getattr(m, "lora_A", {})}
    out = {}
    for key, t in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if key.endswith(".base_layer.weight") and key[:-len(".base_layer.weight")] in deltas:
            t = t.float() + deltas[key[:-len(".base_layer.weight")]].float()
        name = key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")
        out[name] = t.detach().to(dtype).contiguous()
    return out
