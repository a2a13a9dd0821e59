"""Shared pieces of the inference commands (export, generate, chat): model/adapter flags and loading, sampling
flags. The leading underscore keeps it out of the CLI's subcommand discovery (cli._more_commands)."""
from __future__ import annotations

import argparse
from pathlib import Path

from fasttune.errors import ConfigError, ModelLoadError


def add_model_flags(parser, adapter_help: str = "LoRA adapter folder (PEFT format) to apply"):
    """Add --model, --adapter (help text `adapter_help`), --dtype and --debug to an argparse subparser;
    load_model_and_tokenizer reads the first three."""
    parser.add_argument("--model", default=None,
                        help="model folder, .gguf file, adapter folder or hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, help=adapter_help)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on capable "
                                                      "GPUs, fp32 on CPU)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def add_sampling_flags(parser, temperature: float, top_p: float, max_new_tokens: int):
    """Add --max-new-tokens, --temperature, --top-p (with the given defaults), --top-k (default 0, off) and --seed to an
    argparse subparser; sampling_kwargs reads them."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def sampling_kwargs(ns) -> dict:
    """The parsed sampling flags as keyword arguments of model.generate: max_new_tokens, do_sample (temperature > 0;
    temperature 0 decodes greedily and passes temperature 1.0), temperature, top_p, top_k, seed."""
    return dict(max_new_tokens=ns.max_new_tokens, do_sample=ns.temperature > 0,
                temperature=ns.temperature if ns.temperature > 0 else 1.0, top_p=ns.top_p, top_k=ns.top_k,
                seed=ns.seed)


def describe_model(model, adapter=None) -> str:
    """How banners name a loaded model: its path and the adapter applied to it (--adapter), e.g.
    "/m/base.gguf with adapter out/adapter"."""
    return f"{model.name_or_path} with adapter {adapter}" if adapter else str(model.name_or_path)


# quantization of frozen weights (from_pretrained's quant) -> how the train banner names it
QUANTIZATION_NAMES = {"nf4": "int4 NF4", "int8": "int8", "fp8": "FP8 (row scales)"}


def load_model_and_tokenizer(model: str | None, adapter: str | None, dtype: str | None, need_tokenizer=True):
    """--adapter alone loads the adapter's base; --model and --adapter apply the adapter to that model."""
    from fasttune import FastLanguageModel
    from fasttune.api import set_gradient_checkpointing
    from fasttune.api import attach_adapter
    from fasttune.peft.adapter_io import CONFIG_NAME

    if adapter and not (Path(adapter) / CONFIG_NAME).exists():
        raise ModelLoadError(f"--adapter {adapter}: no {CONFIG_NAME} there. Pass the folder written by "
                             f"model.save_pretrained / fasttune train (OUTPUT_DIR/adapter).")
    if adapter and not model:
        m, tok = FastLanguageModel.from_pretrained(adapter, dtype=dtype)
    else:
        m, tok = FastLanguageModel.from_pretrained(model or "", dtype=dtype)
        if adapter:
            if getattr(m, "lora_settings", None) is not None:
                raise ConfigError(f"--model {model} already carries an adapter; pass only one of them.")
            tok = attach_adapter(m, tok, Path(adapter))  # our decoder or the transformers fallback alike
            set_gradient_checkpointing(m, False)
    if need_tokenizer and tok is None:
        raise ModelLoadError(f"'{model or adapter}' has no tokenizer; save one beside the weights "
                             f"(tokenizer.save_pretrained).")
    return FastLanguageModel.for_inference(m), tok
