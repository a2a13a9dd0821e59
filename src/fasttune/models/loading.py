"""Load weights into our decoder: local HF checkpoint folders (single or sharded safetensors, or .bin), .gguf files
(read once by models/gguf_file.py, dequantised with the gguf package), and hub ids when online. Tokenizers come
from the same place.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from fasttune.errors import ConfigError, ModelLoadError
from fasttune.file_readers import (REDOWNLOAD, check_weight_files, iter_safetensors, meta_safetensors,
                                   read_json, torch_load)
from fasttune.models.config import MOE_FAMILIES, SUPPORTED_FAMILIES, ModelConfig, decoder_runs
from fasttune.models.causal_lm import CausalLM
from fasttune.models.sequence_classification import classifier_class, is_classification_config
from fasttune.models.vision_families import FAMILIES as VISION_FAMILIES
from fasttune.models.vision import VisionCausalLM, is_vision_config
from fasttune.quant.fp8 import compressed_tensors_fp8, fp8_tensors
from fasttune.quant.mxfp4 import mxfp4_tensors
# The config and tokenizer helpers live in models/hf_files.py (export/ uses them without the decoder).
from fasttune.models.hf_files import gguf_tokenizer, load_tokenizer, with_architectures
from fasttune.wording import plural

# Buffers some checkpoints carry that our decoder recomputes.
_IGNORED_KEYS = ("rotary_emb.inv_freq", "masked_bias", ".attn.bias")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder or .gguf file as is; otherwise a hub id, downloaded only when online."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf")
    if not looks_like_hub_id:
        raise ModelLoadError(
            f"Model path '{name}' does not exist. Pass a folder with config.json and *.safetensors, a .gguf file, "
            f"an adapter folder saved by fasttune/PEFT, or (online) a Hugging Face hub id such as 'org/model'."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        raise ModelLoadError(
            f"'{name}' is not a local path and the hub is disabled (HF_HUB_OFFLINE=1). Download the model once with "
            f"`huggingface-cli download {name} --local-dir DIR` on a machine with network, then pass DIR."
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # network errors, gated repos, missing repos all mean the same to the user
        raise ModelLoadError(
            f"Could not download '{name}' from the Hugging Face hub ({type(e).__name__}: {e}). If you are offline, "
            f"download it elsewhere and pass the local folder; if the repo is gated, log in with "
            f"`huggingface-cli login`."
        ) from None
    return Path(local)


def load_hf_config(folder: Path):
    """The transformers config of a checkpoint folder (AutoConfig, local files only). Raises ModelLoadError for a folder
    without config.json, a config.json that is not UTF-8 JSON, or one transformers cannot read."""
    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise ModelLoadError(
            f"'{folder}' has no config.json. A model folder needs config.json and *.safetensors (as written by "
            f"`save_pretrained`); for a single .gguf file pass the file path itself."
        )
    model_type = read_json(folder / "config.json").get("model_type")  # not UTF-8 / not JSON: names the file
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(
            f"transformers cannot read {folder / 'config.json'} (model_type '{model_type}'): {e}"
        ) from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map' (tensor name -> shard file). {REDOWNLOAD}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(missing)}. Re-download the model.")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"No weights in '{folder}': expected model.safetensors, sharded safetensors with "
                             f"model.safetensors.index.json, or pytorch_model.bin.")
    return files


def _iter_tensors(files: list[Path]):
    for f in files:  # one shard at a time keeps host memory near one shard
        if f.suffix == ".safetensors":
            yield from iter_safetensors(f)
        else:
            state = torch_load(f)
            if not isinstance(state, dict):
                raise ModelLoadError(f"'{f}' holds a {type(state).__name__}, not a state dict of tensors. "
                                     f"{REDOWNLOAD}")
            yield from state.items()


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor):
    """Put `tensor` at the dotted `name` in `model` as it is (no copy or cast): a frozen Parameter where the module has
    that parameter, else a buffer. Used to fill a model built on the meta device."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


# Model-level dropouts of the families we run (attention weights; Phi-3's residual and embedding dropout), which
# transformers applies while training and our decoder does not.
DROPOUT_FIELDS = ("attention_dropout", "resid_pdrop", "embd_pdrop", "residual_dropout")  # (the last: Seed-OSS's)


def _warn_unapplied_dropout(hf_config, source: str) -> None:
    """A warning naming each DROPOUT_FIELDS value above 0 in the config (e.g. Granite 3's attention_dropout=0.1)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    given = {name: float(get(name, 0.0) or 0.0) for name in DROPOUT_FIELDS}
    given = {name: p for name, p in given.items() if p > 0}
    if given:
        named = ", ".join(f"{name}={p:g}" for name, p in given.items())
        warnings.warn(f"{source}: the config's {named} {'is' if len(given) == 1 else 'are'} not applied: fasttune's "
                      f"decoder runs without model dropout, where transformers drops activations while training. "
                      f"LoRA's own lora_dropout is applied as usual.")


def build_model(hf_config, tensors, dtype: torch.dtype, device, source: str, quant: str | None = None,
                model_cls=CausalLM, store=None) -> CausalLM:
    """Create the decoder on the meta device and fill it tensor by tensor (no full-precision copy in between).

    `model_cls`: CausalLM or a subclass built from the same config (models/vision.py's language model,
    models/sequence_classification.py's SequenceClassifier: a language-model checkpoint's lm_head is then dropped
    and a missing `score` head starts as transformers starts it, normal(0, initializer_range)).
    quant="nf4"/"int8"/"fp8": every decoder Linear (not lm_head) is quantised as its weight arrives, on `device`, so
    peak memory stays near the quantised size; with "nf4" / "fp8" the stacked MoE experts too, each stack once it is
    whole (FP8 experts multiply in 16 bits: quant/experts.py).
    Checkpoints already quantised by bitsandbytes ("bnb-4bit"/"bnb-8bit") load as they are, or are dequantised
    when quant is None.
    store: where the loaded tensors are kept (None: `device`). from_pretrained(fsdp=True) passes the host ("cpu")
    with `device` the GPU: each weight is quantised on the GPU and kept in host memory, so no GPU holds the whole
    model before FSDP shards it (train/fsdp.py's shard_model moves it there a layer at a time)."""
    from fasttune.models.moe import ExpertStacker
    from fasttune.quant.prequantized import PendingQuantized

    with torch.device("meta"):
        model = model_cls(hf_config)
    expected = dict(model.state_dict(keep_vars=True))
    classifier = getattr(model, "is_sequence_classifier", False)
    # the heads stay in the model dtype (never quantised)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in ("lm_head", "score")}
    # tensors that stay fp32 whatever the dtype (GLM-4.5's router: models/moe.py's Router.keep_fp32; LFM2-MoE's
    # expert_bias: SparseMoeBlock.fp32_tensors)
    fp32 = {f"{n}.{a}" for n, m in model.named_modules()
            for a in ((*m._parameters, *m._buffers) if getattr(m, "keep_fp32", False) else
                      getattr(m, "fp32_tensors", ()))}
    store = None if store is None else torch.device(store)
    pending = PendingQuantized(linears, source)
    experts = ExpertStacker(model, expected, store or device, dtype)
    _warn_unapplied_dropout(hf_config, source)
    if quant == "int8" and model.arch.num_experts:
        warnings.warn(f"{source}: the MoE experts are not quantised to int8 (load_in_4bit quantises them to NF4); "
                      f"they load in {dtype}, the other layers in int8.")
    seen, unexpected = set(), []
    mtp = _mtp_layers(hf_config, model.arch.num_layers)
    renames = CHECKPOINT_RENAMES.get(model.arch.model_type, ())
    for name, t in tensors:
        if classifier and name == "lm_head.weight":  # a language model loaded as a classifier
            continue
        name = experts.rename(name)
        for old, new in renames:
            name = name.replace(old, new)
        if mtp and name.startswith(mtp):  # GLM-4.5's multi-token-prediction layer: not loaded (one warning)
            unexpected.append(name)
            continue
        if experts.take(name, t):  # one expert's tensor of a stacked MoE weight
            while quant in ("nf4", "fp8") and experts.just_completed:  # quantised as soon as its stack is whole
                _quantize_experts(model, experts.just_completed.pop(), quant, device)
            continue
        if not name.startswith("model.") and (f"model.{name}" in expected or pending.claims(f"model.{name}")):
            name = f"model.{name}"  # bare decoder checkpoints (no `model.` prefix)
        taken, done = pending.add(name, t)
        if done is not None:
            module_name, state = done
            want = tuple(expected[f"{module_name}.weight"].shape)
            if tuple(state.shape) != want:
                raise ModelLoadError(f"{source}: quantised weight '{module_name}.weight' has shape "
                                     f"{tuple(state.shape)} but the config implies {want}. The checkpoint and "
                                     f"config.json do not match.")
            _install_weight(model, module_name, state.to(device), dtype, quant)
            _keep_on(model.get_submodule(module_name), store)
            seen.add(f"{module_name}.weight")
        if taken:
            continue
        if name not in expected:
            if not name.endswith(_IGNORED_KEYS):
                unexpected.append(name)
            continue
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelLoadError(f"{source}: tensor '{name}' has shape {tuple(t.shape)} but the config implies "
                                 f"{tuple(expected[name].shape)}. The checkpoint and config.json do not match.")
        module_name, _, attr = name.rpartition(".")
        if quant is not None and module_name in linears and attr == "weight":
            from fasttune.quant.linear import quantize

            _install_weight(model, module_name, quantize(t.to(device=device, dtype=dtype), quant), dtype, quant)
            _keep_on(model.get_submodule(module_name), store)
        else:
            assign_tensor(model, name, t.to(device=store or device, dtype=torch.float32 if name in fp32 else dtype))
            if quant in ("nf4", "fp8") and attr in EXPERT_STACKS and module_name.endswith(".experts"):
                _quantize_experts(model, name, quant, device)
        seen.add(name)
    pending.check_complete()
    _warn_unexpected(unexpected, source, mtp)
    seen |= experts.complete()
    cfg = model.arch
    if classifier:
        if "score.weight" not in seen:
            std = float(getattr(hf_config, "initializer_range", 0.02) or 0.02)
            score = torch.empty(tuple(model.score.weight.shape), device=device, dtype=torch.float32)  # (its RNG)
            assign_tensor(model, "score.weight", score.normal_(0.0, std).to(device=store or device, dtype=dtype))
            seen.add("score.weight")
    elif cfg.tie_embeddings:
        seen.add("lm_head.weight")
    elif "lm_head.weight" not in seen and "model.embed_tokens.weight" in seen:
        warnings.warn(f"{source}: no lm_head.weight; tying it to the embeddings.")
        cfg.tie_embeddings = model.config.tie_word_embeddings = True
        seen.add("lm_head.weight")
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks {plural(len(missing), 'tensor')} the config needs, e.g. "
                             f"{', '.join(missing[:4])}. Is it a complete checkpoint of a '{cfg.model_type}' model?")
    model.tie_weights()
    model.requires_grad_(False)
    return model


# Checkpoint names that transformers renames as it loads (its conversion_mapping's WeightRenaming), as
# (on disk, in memory): our modules carry the in-memory names, which PEFT adapters use.
CHECKPOINT_RENAMES = {"lfm3": ((".self_attn.gate_proj.", ".self_attn.g_proj."),),
                      # ERNIE 4.5 MoE's routing bias: transformers 5 keeps it inside the router
                      "ernie4_5_moe": ((".mlp.moe_statics.", ".mlp.gate.moe_statics."),),
                      # Nemotron-H: transformers' backbone.* names, and its embeddings / final norm under ours
                      "nemotron_h": (("backbone.", "model."), ("model.embeddings.", "model.embed_tokens."),
                                     ("model.norm_f.", "model.norm.")),
                      # Granite 4.0-H's stacked experts and router, as transformers 5's conversion_mapping renames them
                      "granitemoehybrid": ((".block_sparse_moe.input_linear.weight",
                                            ".block_sparse_moe.experts.gate_up_proj"),
                                           (".block_sparse_moe.output_linear.weight",
                                            ".block_sparse_moe.experts.down_proj"),
                                           (".block_sparse_moe.router.layer.weight",
                                            ".block_sparse_moe.router.weight"))}


def _mtp_layers(hf_config, layers: int) -> tuple[str, ...]:
    """Name prefixes of the multi-token-prediction layers a checkpoint stores after the last decoder layer
    (GLM-4.5's `model.layers.<num_hidden_layers + i>.`, num_nextn_predict_layers of them)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    extra = int(get("num_nextn_predict_layers", 0) or get("num_mtp_layers", 0) or 0)
    return tuple(f"model.layers.{layers + i}." for i in range(extra))


def _warn_unexpected(names: list[str], source: str, mtp_layers: tuple[str, ...] = ()) -> None:
    """One warning for the checkpoint tensors the config has no place for (a few named), and one for a
    multi-token-prediction head (`mtp.*`, Qwen3.5 / Qwen3-Next / DeepSeek-style releases: hundreds of tensors on MoE
    models; GLM-4.5's extra layers `mtp_layers`), which transformers does not load either: not one warning per
    tensor."""
    is_mtp = [n.startswith(("mtp.", "model.mtp.") + mtp_layers) for n in names]
    mtp = [n for n, m in zip(names, is_mtp) if m]
    others = [n for n, m in zip(names, is_mtp) if not m]
    if mtp:
        warnings.warn(f"{source}: the checkpoint's multi-token-prediction head ({plural(len(mtp), 'tensor')}, "
                      f"e.g. {mtp[0]}) is not loaded, as transformers does not load it: training, merging and "
                      f"generation use the main model.")
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        warnings.warn(f"{source}: ignoring {plural(len(others), 'unexpected tensor')} this config has no place for: "
                      f"{', '.join(others[:5])}{more}.")


EXPERT_STACKS = ("gate_up_proj", "up_proj", "down_proj")  # models/moe.py's Experts parameters (up_proj: ungated)


def _quantize_experts(model: nn.Module, name: str, quant: str = "nf4", device=None):
    """Replace the stacked expert parameter `name` (E, out, in) by its NF4 / FP8 QuantExpertWeight
    (quant/experts.py), quantised on `device` (None: where the stack is) and kept where the stack was."""
    from fasttune.quant.experts import QuantExpertWeight

    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    stack = module._parameters.pop(attr).detach()
    holder = QuantExpertWeight.quantize(stack if device is None else stack.to(device), quant)
    module.add_module(attr, holder.to(stack.device))


def _keep_on(module: nn.Module, store: torch.device | None):
    """Move `module`'s loaded tensors (not those still on the meta device: a bias yet to arrive) to `store`; nothing
    when store is None (tensors stay where they were made)."""
    if store is None:
        return
    for tensors in (module._parameters, module._buffers):
        for name, t in tensors.items():
            if t is not None and not t.is_meta and t.device != store:
                if isinstance(t, nn.Parameter):
                    tensors[name] = nn.Parameter(t.detach().to(store), requires_grad=t.requires_grad)
                else:
                    tensors[name] = t.to(store)


def _install_weight(model: nn.Module, module_name: str, state, dtype: torch.dtype, quant: str | None):
    """Put a quantised weight (NF4State / Int8State) into `module_name`: as a QuantLinear when quantising,
    dequantised into the plain Linear otherwise. A bias loaded earlier moves along."""
    from fasttune.quant.linear import QuantLinear, quantize

    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    if quant is None:
        assign_tensor(model, f"{module_name}.weight", _dequantize(state, dtype))
        return
    if state.quant_type != quant:
        state = quantize(_dequantize(state, dtype), quant)  # a bnb-8bit checkpoint asked for in 4 bits, or back
    bias = old.bias if old.bias is not None and not old.bias.is_meta else None
    layer = QuantLinear(state, bias, dtype)
    if old.bias is not None and bias is None:
        layer.register_parameter("bias", nn.Parameter(torch.empty_like(old.bias, device="meta"), requires_grad=False))
    setattr(parent, attr, layer)


def _dequantize(state, dtype: torch.dtype) -> torch.Tensor:
    from fasttune.quant.linear import QuantLinear

    return QuantLinear(state, None, dtype).dequantized_weight()


def load_vision_model(path: Path, dtype: torch.dtype, device, quant: str | None = None,
                      dequantize_fp8: bool = False, store=None) -> VisionCausalLM:
    """A vision-language checkpoint folder -> VisionCausalLM. transformers loads the whole model on the CPU (it
    knows the checkpoint layouts; an FP8 checkpoint, `dequantize_fp8`, dequantised by its FineGrainedFP8Config), then
    vision_model_from_hf moves it over (`store`: where it is kept, as build_model's). Raises ModelLoadError when
    transformers cannot load it."""
    return vision_model_from_hf(_hf_vision_model(path, dtype, dequantize_fp8), dtype, device, str(path), quant,
                                store=store)


def _hf_vision_model(path: Path, dtype: torch.dtype, dequantize_fp8: bool):
    """transformers' vision-language model of a checkpoint folder, on the CPU; ModelLoadError when it cannot."""
    from transformers import AutoModelForImageTextToText

    kwargs = {}
    if dequantize_fp8:
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"transformers cannot load the vision-language model in '{path}': {e}") from None


def text_classifier_from_vision(path: Path, hf_config, request: dict | None, dtype: torch.dtype, device,
                                quant: str | None = None, dequantize_fp8: bool = False):
    """(SequenceClassifier, its text config): the language model of a vision-language checkpoint (Qwen3.5, Gemma 3)
    as a text classifier, transformers' `<Family>TextForSequenceClassification` (e.g.
    Qwen3_5TextForSequenceClassification), which a merged save writes and AutoModelForSequenceClassification loads;
    the vision tower is not loaded into it. `request`: classifier_request's head settings. Raises ConfigError for a
    checkpoint saved as a vision-language classifier (its head would be dropped) or a family transformers has no
    text classifier for, and ModelLoadError when transformers cannot load the checkpoint."""
    if request is None:  # a checkpoint whose architectures name a classifier with vision inputs
        raise ConfigError(f"'{path}' is a vision-language sequence classifier ({hf_config.architectures[0]}), which "
                          f"fasttune does not load; its text classifiers load, e.g. one saved from this base with "
                          f"auto_model=AutoModelForSequenceClassification.")
    hf = _hf_vision_model(path, dtype, dequantize_fp8)
    text_config, tensors = _language_model(hf)
    model_cls = classifier_class(text_config, request, str(path))
    del hf
    return build_model(text_config, iter(tensors), dtype, device, str(path), quant, model_cls=model_cls), text_config


def _language_model(hf) -> tuple:
    """(a copy of the text config, the language model's tensors under our decoder's names) of transformers'
    vision-language model `hf`; the config's tie_word_embeddings is the whole model's."""
    text_config = copy.deepcopy(hf.config.text_config)
    text_config._experts_implementation = None  # transformers' choice for its own MoE modules; ours are in moe.py
    text_config.tie_word_embeddings = bool(getattr(hf.config, "tie_word_embeddings", False))
    language = getattr(hf.model, "language_model", None)
    language = hf.model.text_model if language is None else language  # (Idefics3 / SmolVLM: text_model)
    return text_config, [(f"model.{k}", v) for k, v in language.state_dict().items()]


def vision_model_from_hf(hf, dtype: torch.dtype, device, source: str, quant: str | None = None,
                         store=None) -> VisionCausalLM:
    """transformers' vision-language model (e.g. Qwen2_5_VLForConditionalGeneration) -> VisionCausalLM: its
    vision modules move to `device` as they are; the language model's tensors fill our decoder (quantised with
    `quant` like a text model). `store`: build_model's (the host for from_pretrained(fsdp=True): quantised on
    `device`, kept there, the vision modules too). The language half of `hf` is left to the caller to free."""
    family = VISION_FAMILIES[hf.config.model_type]
    tower = getattr(hf.config.vision_config, "model_type", None)
    if family.layer_features and tower not in ("clip_vision_model", "siglip_vision_model"):
        raise ModelLoadError(f"'{source}' is a LLaVA model with a {tower} vision tower; fasttune runs LLaVA with "
                             f"CLIP or SigLIP towers (fixed-size images), and Pixtral's in Mistral 3 checkpoints.")
    text_config, tensors = _language_model(hf)
    if family.model_type == "gemma4":  # an image's tokens see each other only where the config says so
        family = replace(family, bidirectional_images=getattr(text_config, "use_bidirectional_attention",
                                                              None) == "vision")
    if not text_config.tie_word_embeddings:
        tensors.append(("lm_head.weight", hf.lm_head.weight))
    model = build_model(text_config, iter(tensors), dtype, device, source, quant, model_cls=VisionCausalLM,
                        store=store)
    modules = {attr: _moved(getattr(hf.model, hf_name), device if store is None else store, dtype)
               for attr, hf_name in family.vision_modules
               if getattr(hf.model, hf_name, None) is not None}  # (Gemma 4 without audio has no audio tower)
    model.attach_vision(hf.config, family, modules)
    return model


def _moved(part, device, dtype):
    """A vision module, or a bare parameter (LLaVA-NeXT's image_newline, kept a parameter so that saves hold it), on
    `device` in `dtype`."""
    moved = part.to(device=device, dtype=dtype)
    return torch.nn.Parameter(moved, requires_grad=False) if isinstance(part, torch.nn.Parameter) else moved


def load_model(path: Path, dtype: torch.dtype, device, fast: bool = True, quant: str | None = None,
               classifier: dict | None = None, store=None):
    """Returns (model, transformers config). `path` is a resolved folder or .gguf file. Architectures outside our
    decoder, and every model when fast=False, load through transformers (+ PEFT later): a FallbackModel.
    `classifier`: None, or the sequence-classification head asked for ({"num_labels": ..., ...}, see
    models/sequence_classification.py's classifier_config); a checkpoint saved as a classifier loads as one too.
    `store`: build_model's (the host for from_pretrained(fsdp=True)); "meta" builds the model from the safetensors
    headers alone, on the meta device (a rank that receives its weights from rank 0: train/fsdp.py), or, for
    checkpoints whose tensors must be read (pre-quantised, .bin), in host memory. ConfigError for the models that do
    not load through build_model (vision-language models, the transformers fallback)."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"'{path}' is a file but not a .gguf; pass a model folder or a .gguf file.")
        return _load_gguf(path, dtype, device, fast, quant, classifier=classifier, store=store)
    hf_config = with_architectures(load_hf_config(path))
    # damaged weight files are named here, on both paths, before anything is loaded
    check_weight_files(sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin")))
    if is_vision_config(hf_config):
        if store is not None and (classifier is not None or is_classification_config(hf_config)):
            _refuse_staging(path, f"a sequence classifier on a {hf_config.model_type} vision-language model",
                            shardable=True)
        if not fast:
            raise ModelLoadError(f"'{path}' is a {hf_config.model_type} vision-language model, which the "
                                 f"transformers fallback (fast=False) does not load; leave fast at True (its language "
                                 f"model runs on fasttune's decoder, its vision tower is transformers' own).")
        method, _ = checkpoint_quantization(hf_config, path, fallback=False)
        if classifier is not None or is_classification_config(hf_config):
            return text_classifier_from_vision(path, hf_config, classifier, dtype, device, quant, method == "fp8")
        # (from_pretrained(fsdp=True): transformers reads the whole checkpoint into host memory on every rank anyway,
        # so every rank keeps its model there, the ranks after the first too: none waits on the meta device)
        return load_vision_model(path, dtype, device, quant, dequantize_fp8=method == "fp8",
                                 store=None if store is None else "cpu"), hf_config
    model_cls = classifier_class(hf_config, classifier, str(path), fast)  # (fallback families are refused in it)
    # (decoder_runs: a family's layouts the decoder lacks, e.g. Granite 4.0-H's experts, stay on the fallback too)
    if not fast or not decoder_runs(hf_config):
        from fasttune.models.fallback import load_fallback

        if store is not None:
            _refuse_staging(path, "a model that runs on the transformers fallback")

        model = load_fallback(path, dtype, device, hf_config.model_type, forced=fast is False, hf_config=hf_config,
                              vision_families=tuple(VISION_FAMILIES),
                              quant=quant)
        return model, model.hf_config
    ModelConfig.from_hf(hf_config)  # unsupported settings fail here, before any tensor is read
    method, block = checkpoint_quantization(hf_config, path)
    files = _weight_files(path)
    if store is not None and torch.device(store).type == "meta":
        if method is None and all(f.suffix == ".safetensors" for f in files):  # shapes alone: rank 0 sends the data
            tensors = (t for f in files for t in meta_safetensors(f))
            return build_model(hf_config, tensors, dtype, "meta", str(path), quant, model_cls=model_cls), hf_config
        store = "cpu"  # (a pre-quantised or .bin checkpoint: its tensors are read and kept in host memory)
    tensors = _iter_tensors(files)
    if method == "mxfp4":
        tensors = mxfp4_tensors(tensors, dtype)
    elif method in ("fp8", "compressed-tensors"):  # (compressed-tensors stores the scale, not its inverse)
        tensors = fp8_tensors(tensors, dtype, block, str(path), device,
                              "_scale" if method == "compressed-tensors" else "_scale_inv")
    model = build_model(hf_config, tensors, dtype, device, str(path), quant, model_cls=model_cls, store=store)
    return model, hf_config


def _refuse_staging(path: Path, what: str, shardable: bool = False):
    """ConfigError: from_pretrained(fsdp=True) for a model FSDP does not shard, or (`shardable`) one that the
    trainer's fsdp=True shards but that this load cannot keep in host memory for it."""
    if shardable:
        raise ConfigError(f"from_pretrained(fsdp=True): '{path}' is {what}, which this load does not keep in host "
                          f"memory for FSDP yet. Load it without fsdp=True: the trainer's fsdp=True still shards it "
                          f"(each rank loads it whole onto its GPU first).")
    raise ConfigError(f"from_pretrained(fsdp=True): '{path}' is {what}, which fsdp=True training does not shard "
                      f"(it needs fasttune's own text decoder). Load it without fsdp=True and train on one GPU, or on "
                      f"several with plain data parallelism (torchrun without fsdp).")


# quantization_config methods whose checkpoints we read (compressed-tensors: its FP8 formats only)
READ_QUANTIZATION = ("bitsandbytes", "mxfp4", "fp8", "compressed-tensors")


def checkpoint_quantization(hf_config, path, fallback: bool = True) -> tuple[str | None, list | None]:
    """(quant_method, FP8 weight_block_size) of a checkpoint's quantization_config, or (None, None) for plain
    weights. MXFP4 (gpt-oss's experts as OpenAI publishes them) and FP8 (quant/fp8.py) are dequantised to the model
    dtype on load, so their quantization_config is dropped here: the model, and what it saves, holds plain weights;
    bitsandbytes' pre-quantised weights load as they are (quant/prequantized.py). Raises ModelLoadError, before any
    tensor is read, for another method (GPTQ, AWQ, compressed-tensors, ...), whose weights would otherwise load as
    wrong numbers; its message offers fast=False where the transformers fallback can load the model (`fallback`;
    False for vision-language models, which also take no compressed-tensors checkpoint). compressed-tensors' FP8
    ("float-quantized") is read as FP8 with the scales themselves (quant/fp8.compressed_tensors_fp8)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None, None
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    method = get("quant_method")
    method = str(getattr(method, "value", method)).lower() if method is not None else None
    if method not in READ_QUANTIZATION:
        raise ModelLoadError(
            f"'{path}' holds weights quantised with {method!r} (config.json's quantization_config), which fasttune's "
            f"decoder does not read: it reads 16-bit checkpoints and bitsandbytes (NF4 / int8), FP8 and MXFP4 ones. "
            f"Load the model's 16-bit checkpoint (load_in_4bit=True quantises it for QLoRA)"
            + (", or pass fast=False to train this one through transformers + PEFT with that method's own package "
               "installed." if fallback else "."))
    block = get("weight_block_size")
    if method == "compressed-tensors":
        fp8, block = compressed_tensors_fp8(get)
        if not fp8 or not fallback:  # (a vision-language model: transformers' loader needs compressed-tensors)
            kind = "a vision-language model" if fp8 else f"format {get('format')!r}"
            raise ModelLoadError(f"'{path}' is a compressed-tensors checkpoint ({kind}); fasttune reads its FP8 "
                                 f"weights ('float-quantized') of text models only. Load the model's 16-bit "
                                 f"checkpoint (load_in_4bit=True quantises it for QLoRA).")
    if method in ("mxfp4", "fp8", "compressed-tensors"):
        del hf_config.quantization_config
    return method, (list(block) if block else None)


GGUF_MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "qwen3_5_moe_text", "qwen3_next")


def _load_gguf(path: Path, dtype: torch.dtype, device, fast: bool = True, quant: str | None = None, contents=None,
               classifier: dict | None = None, store=None):
    """A .gguf file, parsed once (models/gguf_file.py): `contents` is that parse when the caller has it."""
    from transformers import AutoConfig

    from fasttune.models.gguf_file import read_gguf

    contents = read_gguf(path) if contents is None else contents
    cfg_dict = dict(contents.config)
    model_type = cfg_dict.pop("model_type", None)
    # MoE GGUF files load onto our decoder for the families whose llama.cpp expert tensors gguf_file.py stacks and
    # tests (qwen3moe, llama with experts = Mixtral, gpt-oss); other MoE files go through transformers.
    moe_elsewhere = model_type in MOE_FAMILIES and model_type not in GGUF_MOE_FAMILIES
    if classifier is not None and (not fast or model_type not in SUPPORTED_FAMILIES or moe_elsewhere):
        classifier_class(AutoConfig.for_model(model_type, **cfg_dict), classifier, str(path), fast,
                         fallback=True)  # refused: the fallback has no classifier
    if not fast or model_type not in SUPPORTED_FAMILIES or moe_elsewhere:
        from fasttune.models.fallback import load_fallback

        if store is not None:
            _refuse_staging(path, "a model that runs on the transformers fallback")
        model = load_fallback(path.parent, dtype, device, model_type, forced=fast is False, gguf_file=path.name,
                              quant=quant)
        return model, model.hf_config
    hf_config = AutoConfig.for_model(model_type, **cfg_dict)
    model_cls = classifier_class(hf_config, classifier, str(path), True)
    hf_config = with_architectures(hf_config)
    ModelConfig.from_hf(hf_config)
    if store is not None and torch.device(store).type == "meta":
        store = "cpu"  # (a GGUF's tensors are read and dequantised: kept in host memory, as load_model's .bin files)
    with torch.device("meta"):  # our parameter names are transformers' names
        names = {n: t.shape for n, t in CausalLM(hf_config).state_dict().items()}
    try:
        model = build_model(hf_config, contents.tensors(names), dtype, device, str(path), quant, model_cls=model_cls,
                            store=store)
    except (ValueError, KeyError, NotImplementedError) as e:  # a tensor type the gguf package cannot dequantise
        raise ModelLoadError(f"Cannot load the weights of '{path}' ({type(e).__name__}: {e}). The file may use a "
                             f"tensor type newer than the installed gguf package (`pip install -U gguf`), or be "
                             f"damaged (download it again).") from None
    return model, hf_config


def load_model_and_tokenizer(path: Path, dtype: torch.dtype, device, fast: bool = True, quant: str | None = None,
                             classifier: dict | None = None, store=None):
    """(model, transformers config, tokenizer or None) of a resolved folder or .gguf file, as load_model (with its
    `store`) and load_tokenizer(required=False) give them; a .gguf file is read once for all three."""
    if path.is_file() and path.suffix == ".gguf":
        from fasttune.models.gguf_file import read_gguf

        contents = read_gguf(path)
        model, hf_config = _load_gguf(path, dtype, device, fast, quant, contents, classifier=classifier, store=store)
        return model, hf_config, gguf_tokenizer(contents, required=False)
    model, hf_config = load_model(path, dtype, device, fast=fast, quant=quant, classifier=classifier, store=store)
    if isinstance(model, VisionCausalLM):
        from fasttune.data.vision import VisionProcessor
        from fasttune.data.vision_settings import processor_settings

        tokenizer = load_tokenizer(path)
        return model, hf_config, VisionProcessor.from_pretrained(
            path, tokenizer=tokenizer, **processor_settings(model.hf_config, tokenizer))
    return model, hf_config, load_tokenizer(path, required=False)


