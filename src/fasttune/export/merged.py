"""Full checkpoints that transformers loads: LoRA merged into the base (save_method="merged_16bit"; "merged_4bit":
bitsandbytes NF4; "merged_fp8": FineGrainedFP8 with 128 x 128 block scales, as transformers and vLLM read the Qwen3
"-FP8" releases), or the adapter alone (save_method="lora"). Written into a temporary folder and renamed into place
when complete."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from fasttune.atomic import atomic_folder
from fasttune.errors import ConfigError
from fasttune.models.hf_files import with_architectures
from fasttune.peft.adapter_io import checkpoint_names, save_adapter
from fasttune.peft.lora import LoraLinear, expert_lora_layers
from fasttune.sharding import is_sharded, writes_here

SAVE_METHODS = ("merged_16bit", "merged_4bit", "merged_fp8", "lora")
# The peer's names for the same methods: it refuses "merged_4bit" for saving and asks for "merged_4bit_forced", so
# scripts written for it carry that name.
SAVE_METHOD_ALIASES = {"merged_4bit_forced": "merged_4bit"}


def save_method_name(save_method: str) -> str:
    """`save_method` as one of SAVE_METHODS (the peer's aliases resolved). Raises ConfigError for another name."""
    name = SAVE_METHOD_ALIASES.get(save_method, save_method)
    if name not in SAVE_METHODS:
        raise ConfigError(f"save_method='{save_method}' is not supported; use one of {SAVE_METHODS} "
                          f"(or 'merged_4bit_forced', the same as 'merged_4bit').")
    return name
FP8_BLOCK = (128, 128)  # merged_fp8's weight_block_size
# transformers' BitsAndBytesConfig for what merged_4bit writes (NF4, double-quantised, blocksize 64).
BNB_4BIT_CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                   "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "uint8",
                   "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
                   "llm_int8_enable_fp32_cpu_offload": False}
MAX_SHARD_BYTES = 5 * 1024**3


def _plain_tensors(model):
    """model.state_dict() with quantised (NF4 / int8 / FP8) layers and expert stacks dequantised to fp32 under their
    plain names."""
    from fasttune.quant.experts import QuantExpertWeight
    from fasttune.quant.linear import QuantLinear

    quant = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExpertWeight))}
    for name, t in model.state_dict().items():
        owner = next((n for n in quant if name.startswith(n + ".")), None)
        if owner is None:
            yield name, t
        elif isinstance(quant[owner], QuantExpertWeight):
            if name == f"{owner}.{quant[owner].first_buffer}":  # one stack, under the parameter name it stands for
                yield owner, quant[owner].dequantized(torch.float32)
        elif name == f"{owner}.weight":
            yield name, quant[owner].dequantized_weight(torch.float32)
        elif name == f"{owner}.bias":
            yield name, t


def merged_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors with each LoRA delta (linear layers, routers, stacked MoE experts) folded into its base
    weight (merged in fp32, then cast). Quantised
    base weights are dequantised first, so a QLoRA model exports as a 16-bit checkpoint."""
    if is_sharded(model):
        raise ConfigError("Merged and GGUF exports need the whole base model, which FSDP keeps sharded over the "
                          "ranks. Save the adapter (save_pretrained), then merge it in one process: `fasttune export` "
                          "or FastLanguageModel.from_pretrained(adapter) and save_pretrained_merged.")
    out = {}
    hf_name = checkpoint_names(model)
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    experts = dict(expert_lora_layers(model))  # stacked expert weight name -> its ExpertLora
    # An ExpertLora's own tensors (<experts>.lora.<param>.lora_A / lora_B) are merged into <experts>.<param>.
    adapter_tensors = {f"{owner}.lora.{param}.{ab}" for owner, _, param in (n.rpartition(".") for n in experts)
                       for ab in ("lora_A", "lora_B")}
    for name, t in _plain_tensors(model):
        if name in adapter_tensors:
            continue
        if name in experts:
            t = t.float() + experts[name].delta_weight().float()
        owner = next((n for n in lora if name.startswith(n + ".")), None)
        if owner is not None:
            rest = name[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B
            name = f"{owner}.{rest[len('base_layer.'):]}"
            if rest == "base_layer.weight":
                t = t.float() + lora[owner].delta_weight().float()
        if name == "lm_head.weight" and model.arch.tie_embeddings:
            continue
        out[hf_name(name)] = t.detach().to(dtype).contiguous().cpu()
    return out


def _nf4_linears(model, tensors: dict) -> dict:
    """The decoder's Linear weights (merged; `tensors` under checkpoint names) re-quantised to NF4 in bitsandbytes'
    keys; lm_head (a classifier's score), embeddings, norms and a vision-language model's vision modules stay
    16-bit (the modules `skipped_4bit_modules` names), as transformers + bitsandbytes keep them."""
    from fasttune.quant.nf4 import quantize_nf4, state_to_tensors

    linears = _decoder_linears(model)
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and name[:-len(".weight")] in linears:
            out.update({k: v.contiguous() for k, v in state_to_tensors(quantize_nf4(t), name).items()})
        else:
            out[name] = t
    return out


def _fp8_linears(model, tensors: dict) -> dict:
    """The decoder's Linear weights (merged; `tensors` under checkpoint names) as FineGrainedFP8 values and block
    scales (`X.weight`, `X.weight_scale_inv`); the rest as it is (the same modules as _nf4_linears)."""
    from fasttune.quant.fp8 import quantize_fp8_blocks

    out = {}
    linears = _decoder_linears(model)
    for name, t in tensors.items():
        if name.endswith(".weight") and name[:-len(".weight")] in linears:
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(t, FP8_BLOCK)
        else:
            out[name] = t
    return out


def _decoder_linears(model) -> set:
    """Checkpoint names of the Linear modules quantised exports quantise: the decoder's, not lm_head, a
    classifier's score or a vision-language model's vision modules."""
    from fasttune.quant.linear import QuantLinear

    hf_name = checkpoint_names(model)
    vision = [attr for attr, _ in model.family.vision_modules] if getattr(model, "family", None) else []
    # (a vision module may be a Linear itself: Llama 3.2 Vision's multi_modal_projector)
    return {hf_name(n.removesuffix(".base_layer")) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, QuantLinear)) and "lm_head" not in n and n != "score"
            and not any(n == attr or n.startswith(attr + ".") for attr in vision)}


def skipped_4bit_modules(model) -> list[str] | None:
    """bitsandbytes' llm_int8_skip_modules for a merged_4bit checkpoint: a vision-language model's vision modules
    (transformers' names, e.g. "model.visual" or "model.vision_tower" and "model.multi_modal_projector") and lm_head
    stay 16-bit, as load_in_4bit=True keeps them; None (transformers' default, lm_head only) for a text model. Full
    module paths: transformers 5 matches them from the start of a module's name. A sequence classifier's head:
    ["score"]."""
    if getattr(model, "is_sequence_classifier", False):
        return ["score"]
    if getattr(model, "family", None) is None:
        return None
    return [f"model.{hf}" for _, hf in model.family.vision_modules] + ["lm_head"]


def _write_shards(tensors: dict, folder: Path):
    import json

    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# Keywords scripts pass to save_pretrained_merged that change nothing here (we write one local safetensors folder).
SAVE_MERGED_IGNORED = ("safe_serialization", "max_shard_size", "token", "temporary_location",
                       "maximum_memory_usage")


def save_merged(model, folder, tokenizer=None, save_method: str = "merged_16bit") -> Path:
    """Save `model` to `folder` for transformers and return the folder. save_method: "merged_16bit" (LoRA merged,
    in the model's dtype, safetensors sharded at 5 GiB), "merged_4bit" (the same with the decoder's Linear weights
    re-quantised to bitsandbytes NF4), "merged_fp8" (those weights in FP8 with 128 x 128 block scales,
    transformers' FineGrainedFP8 config; dense models), or "lora" (the adapter alone, PEFT's format);
    "merged_4bit_forced" (the peer's name) is "merged_4bit". `tokenizer`,
    if given, is saved alongside. The merged folder is written atomically (see atomic_folder).

    Raises ConfigError for an unknown save_method, merged_fp8 of a mixture-of-experts model or a merged save of an
    FSDP-sharded model, and WriteError (a ConfigError) when the disk is full or not writable."""
    save_method = save_method_name(save_method)
    if save_method == "merged_fp8" and getattr(model.arch, "num_experts", 0):
        raise ConfigError("save_method='merged_fp8' writes dense models (FineGrainedFP8 Linear weights); this model's "
                          "stacked MoE experts have no FP8 layout here. Save merged_16bit (or merged_4bit).")
    folder = Path(folder)
    if save_method == "lora":
        if tokenizer is None or not writes_here(model):
            save_adapter(model, folder)  # FSDP: every rank gathers, rank 0 writes
            return folder
        with atomic_folder(folder, "the adapter") as tmp:  # adapter and tokenizer as one unit: all or nothing
            save_adapter(model, tmp)
            tokenizer.save_pretrained(tmp)
        return folder
    if not is_sharded(model) and not writes_here(model):  # DDP: rank 0 writes the (identical) merged model
        return folder
    dtype = model.dtype  # the base's precision: bf16/fp16 on GPU, fp32 for CPU-trained models
    with atomic_folder(folder, "the merged model") as tmp:
        tensors = merged_state_dict(model, dtype)
        hf_config = with_architectures(copy.deepcopy(model.hf_config))
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config  # a QLoRA base: the merged weights are plain unless asked below
        if save_method == "merged_4bit":
            tensors = _nf4_linears(model, tensors)
            hf_config.quantization_config = dict(BNB_4BIT_CONFIG, bnb_4bit_compute_dtype=str(dtype)[6:],
                                                 llm_int8_skip_modules=skipped_4bit_modules(model))
        elif save_method == "merged_fp8":
            tensors = _fp8_linears(model, tensors)
            hf_config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                             "weight_block_size": list(FP8_BLOCK),
                                             "modules_to_not_convert": skipped_4bit_modules(model)}
        _write_shards(tensors, tmp)
        hf_config.tie_word_embeddings = model.arch.tie_embeddings
        if isinstance(getattr(type(hf_config), "torch_dtype", None), property):  # a deprecated alias of dtype
            hf_config.dtype = str(dtype).removeprefix("torch.")
        else:  # transformers < 4.56 knows only torch_dtype
            hf_config.torch_dtype = str(dtype).removeprefix("torch.")
        hf_config.save_pretrained(tmp)
        try:
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        except ValueError:
            pass  # a config without generation fields needs no generation_config.json
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder
