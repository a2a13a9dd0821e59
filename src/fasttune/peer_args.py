"""The peer's (Unsloth's) keyword arguments of from_pretrained and get_peft_model that are not fasttune parameters,
so that its scripts run with only the import changed: each is accepted (no effect here), translated, or accepted at
its default and otherwise refused with the fix, never "unknown".
"""
from __future__ import annotations

from fasttune.errors import ConfigError

# No effect here. max_seq_length on get_peft_model and loftq_config are Unsloth's leftovers; token,
# trust_remote_code, fix_tokenizer, rope_scaling, attn_implementation, revision-free loading and the vLLM settings
# (fast_inference, max_lora_rank, gpu_memory_utilization, float8_kv_cache, disable_log_stats) configure a hub download
# or vLLM there: here generation, also inside TRL's GRPOTrainer (through model.generate), runs on fasttune's own
# KV-cache generate. use_exact_model_name: fasttune never swaps a name for another repository. unsloth_tiled_mlp:
# our decoder tiles the MLP by itself on long rows (models/tiled_mlp.py). temporary_location: a folder Unsloth
# writes LoftQ buffers to. random_state at load: the LoRA weights are seeded by get_peft_model's random_state.
NO_EFFECT = {"max_seq_length", "loftq_config", "use_gradient_checkpointing_ratio", "token", "trust_remote_code",
             "fix_tokenizer", "rope_scaling", "attn_implementation", "init_lora_weights", "task_type",
             "fast_inference", "max_lora_rank", "gpu_memory_utilization", "float8_kv_cache", "disable_log_stats",
             "use_exact_model_name", "unsloth_tiled_mlp", "temporary_location", "random_state"}
# argument -> (values that keep fasttune's behaviour, the fix for any other)
REFUSED = {
    "revision": ((None, "main"), "fasttune loads folders and .gguf files; download that revision into a folder "
                                 "and load the folder"),
    "resize_model_vocab": ((None,), "add tokens with FastLanguageModel.add_new_tokens(model, tokenizer, [...]), "
                                    "which grows the embeddings and the LM head to match"),
    "qat_scheme": ((None,), "quantization-aware training is not implemented; train with LoRA or QLoRA "
                            "(load_in_4bit=True)"),
    "float32_mixed_precision": ((None, False), "fasttune trains in the model's dtype (bf16 or fp16 on a GPU, fp32 "
                                               "on a CPU); pick it with dtype="),
    "layers_to_transform": ((None,), "LoRA on chosen layers only is not implemented; LoRA goes on every layer's "
                                     "target_modules (rank_pattern can set other ranks per layer)"),
    "layers_pattern": ((None,), "LoRA on chosen layers only is not implemented (see layers_to_transform)"),
    "ensure_weight_tying": ((False, None), "fasttune keeps a tied LM head frozen with the embedding; leave "
                                           "ensure_weight_tying off"),
}
CHECKPOINTING_AT_LOAD = "use_gradient_checkpointing"


def checked_kwargs(method: str, kwargs: dict, allowed: tuple = ()) -> dict:
    """The peer's extra arguments of `method` ("from_pretrained" or "get_peft_model"): returns those fasttune
    applies ({"device": ...} from device_map, {"load_in_16bit": ...}, {"use_gradient_checkpointing": ...} at load,
    and any name in `allowed`), drops the NO_EFFECT ones. Raises ConfigError naming an argument that is refused
    (REFUSED, other values), a device_map over several devices, and an unknown argument."""
    out = {}
    for key, value in kwargs.items():
        if key in allowed:
            out[key] = value
        elif key == "device_map" and method == "from_pretrained":
            device = _device_from_map(value)
            if device is not None:
                out["device"] = device
        elif key in ("load_in_16bit", CHECKPOINTING_AT_LOAD) and method == "from_pretrained":
            out[key] = value
        elif key in REFUSED:
            ok, fix = REFUSED[key]
            if value not in ok:
                raise ConfigError(f"{method}({key}={value!r}) is not supported: {fix}.")
        elif key not in NO_EFFECT:
            raise ConfigError(f"{method} got an unknown argument '{key}'.")
    return out


def _device_from_map(device_map):
    """transformers' / Unsloth's device_map -> the one device to load on, or None for fasttune's own choice (the
    local GPU, else the CPU): "auto" / "sequential" / "balanced" on one device, a device string or index, or
    {"": device} (per-rank loading under torchrun). A map over several devices (model parallelism) is refused."""
    if device_map is None or device_map in ("auto", "sequential", "balanced", "balanced_low_0"):
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ConfigError(f"device_map={device_map!r} spreads the model over several devices, which fasttune does "
                              f"not do: it trains on one GPU per process (torchrun with fsdp=True shards a model too "
                              f"large for one GPU).")
        device_map = devices.pop()
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return str(device_map)
