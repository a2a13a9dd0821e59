"""model.generate()'s keyword arguments, read as transformers' generate() reads them, and checked.

Precedence as in transformers: keyword arguments > the `generation_config` argument > `model.generation_config`
> transformers' global defaults (do_sample False, temperature 1, top_k 50, top_p 1, ...); in a GenerationConfig a
field left None is unset. One difference: with neither max_new_tokens nor max_length given anywhere, 32 new
tokens are made (transformers: 20). Both of fasttune's model kinds check their arguments here, so an unsupported
or misspelt argument is the same ConfigError on our decoder and on the transformers fallback.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

from fasttune.errors import ConfigError

DEFAULT_MAX_NEW_TOKENS = 32

# GenerationConfig fields fasttune's generate implements, with transformers' global default.
SUPPORTED = {"max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": 0,
             "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
             "repetition_penalty": 1.0, "num_return_sequences": 1, "eos_token_id": None, "pad_token_id": None,
             "bos_token_id": None, "use_cache": True, "output_scores": False, "output_logits": False,
             "return_dict_in_generate": False}
# Fields that change how transformers computes, not what it returns (caches, compilation), or that only act
# together with a mode refused below (beam search, assisted generation): accepted and ignored.
IGNORED = {"cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
           "prefill_chunk_size", "low_memory", "continuous_batching_config", "decoder_start_token_id", "is_assistant",
           "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
           "assistant_lookbehind", "target_lookbehind", "early_stopping", "length_penalty", "transformers_version"}
# generate() arguments that are not GenerationConfig fields. Those mapped to None must be None (or absent).
# (labels: PaliGemmaProcessor returns them with every prompt; no effect, as token_type_ids)
CALL_ARGS = {"inputs", "generation_config", "logits_processor", "stopping_criteria", "streamer", "seed",
             "tokenizer", "token_type_ids", "labels", "synced_gpus"}
REFUSED_CALL_ARGS = {"prefix_allowed_tokens_fn": "constrained generation", "assistant_model": "assisted generation",
                     "assistant_tokenizer": "assisted generation", "negative_prompt_ids": "classifier-free guidance",
                     "negative_prompt_attention_mask": "classifier-free guidance",
                     "custom_generate": "custom decoding loops", "past_key_values": "continuing from a cache",
                     "inputs_embeds": "generation from embeddings"}
# What some refused GenerationConfig fields turn on, for the error message.
MODES = {"num_beams": "beam search", "num_beam_groups": "group beam search", "diversity_penalty": "group beam search",
         "penalty_alpha": "contrastive search", "constraints": "constrained beam search",
         "force_words_ids": "constrained beam search", "prompt_lookup_num_tokens": "prompt-lookup decoding",
         "assistant_early_exit": "assisted generation", "use_mtp": "assisted generation",
         "dola_layers": "DoLa decoding", "guidance_scale": "classifier-free guidance", "stop_strings": "stop strings",
         "output_attentions": "attention outputs", "output_hidden_states": "hidden-state outputs"}


@dataclass
class GenerationSettings:
    """Everything generate() needs, resolved for one prompt batch of length `prompt_length`.

    max_new_tokens: how many tokens at most; min_new_tokens: eos ids are suppressed before that many new tokens;
    min_length_used / min_new_tokens_used: which of transformers' two minimum-length processors are on.
    temperature/top_k/top_p/min_p: None = that filter is off (all off when not sampling)."""
    max_new_tokens: int
    min_new_tokens: int
    min_length_used: bool
    min_new_tokens_used: bool
    do_sample: bool
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    num_return_sequences: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    output_scores: bool
    output_logits: bool
    return_dict_in_generate: bool


@lru_cache(maxsize=1)
def _transformers_defaults() -> dict:
    from transformers import GenerationConfig

    return GenerationConfig._get_default_generation_params()


@lru_cache(maxsize=1)
def _known_fields() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(k for k in vars(GenerationConfig()) if not k.startswith("_"))


def _refusal(name: str, value, source: str) -> ConfigError:
    mode = MODES.get(name) or REFUSED_CALL_ARGS.get(name)
    what = f" ({mode})" if mode else ""
    shown = type(value).__name__ if callable(value) or hasattr(value, "config") else repr(value)
    default = _transformers_defaults().get(name)
    return ConfigError(
        f"generate(): {name}={shown}{what} ({source}) is not supported by fasttune's generate, which does greedy "
        f"decoding and sampling (temperature, top_k, top_p, min_p, repetition_penalty, min_new_tokens, "
        f"num_return_sequences, logits_processor, stopping_criteria). Leave {name} out"
        + (f" (or set it to {default!r})" if default is not None else "")
        + "; for other decoding modes, save the merged model (model.save_pretrained_merged) and call transformers' "
          "generate on it.")


def _is_noop(name: str, value) -> bool:
    """None, False, or transformers' default value for that field (e.g. num_beams=1): asks for nothing."""
    if value is None or value is False:
        return True
    try:
        return bool(value == _transformers_defaults().get(name, object()))
    except (TypeError, ValueError, RuntimeError):  # a tensor or list compared with a scalar
        return False


def check_arguments(kwargs: dict) -> None:
    """Raise ConfigError for a keyword argument of generate() that is misspelt, unknown, or asks for a decoding
    mode or option fasttune does not implement (num_beams > 1, penalty_alpha, assistant_model, ...)."""
    known = _known_fields()
    for name, value in kwargs.items():
        if name in SUPPORTED or name in IGNORED or name in CALL_ARGS:
            continue
        if name in REFUSED_CALL_ARGS:
            if value is not None:
                raise _refusal(name, value, "passed to generate()")
            continue
        if name in known:
            if not _is_noop(name, value):
                raise _refusal(name, value, "passed to generate()")
            continue
        close = difflib.get_close_matches(name, sorted(set(SUPPORTED) | CALL_ARGS | known), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"generate() got an unknown argument '{name}'.{hint} It takes transformers' generation "
                          f"arguments (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, "
                          f"repetition_penalty, num_return_sequences, eos_token_id, generation_config, ...); check "
                          f"the spelling.")


def _config_fields(config, source: str) -> dict:
    """The set (non-None) fields of a GenerationConfig, checked like keyword arguments. Unknown custom entries
    are skipped, as transformers does not use them for decoding either."""
    from transformers import GenerationConfig

    if config is None:
        return {}
    if not isinstance(config, GenerationConfig):
        raise ConfigError(f"generate(): {source} must be a transformers GenerationConfig, not "
                          f"{type(config).__name__}; e.g. GenerationConfig(max_new_tokens=64, do_sample=True).")
    known = _known_fields()
    out = {}
    for name, value in vars(config).items():
        if name.startswith("_"):
            continue
        if value is None or name not in known or name in IGNORED:
            continue
        if name not in SUPPORTED and not _is_noop(name, value):
            raise _refusal(name, value, f"set in {source}")
        out[name] = value
    return out


def merged_options(model_config, generation_config, kwargs: dict, default_eos=None) -> dict:
    """The generation fields in force, with transformers' precedence (see module docstring): `kwargs` (generate()'s
    keyword arguments, checked with check_arguments) over `generation_config` (the argument) over `model_config`
    (the model's own GenerationConfig, or None; then `default_eos` is the default stop id). Raises ConfigError."""
    check_arguments(kwargs)
    options = _config_fields(model_config, "model.generation_config")
    if model_config is None and default_eos is not None:
        options["eos_token_id"] = default_eos
    options.update(_config_fields(generation_config, "the generation_config argument"))
    options.update({k: v for k, v in kwargs.items() if k in SUPPORTED})
    return options


def prompt_argument(input_ids, attention_mask, kwargs: dict):
    """(prompt ids, attention mask) from `input_ids` or transformers' `inputs` alias (popped from kwargs). The prompt
    may also be a tokenizer's output (a BatchEncoding or dict with `input_ids` and optionally `attention_mask`), which
    is what transformers 5's `tokenizer.apply_chat_template(..., return_tensors="pt")` returns and what scripts
    written for transformers 4 pass as `input_ids=`; its mask is used then. Raises ConfigError when the prompt is
    given twice or not at all, when such a mapping has no `input_ids`, or when the mask is given twice."""
    from collections.abc import Mapping

    inputs = kwargs.pop("inputs", None)
    if input_ids is not None and inputs is not None:
        raise ConfigError("generate(): the prompt was given twice (input_ids and inputs); pass one of them.")
    input_ids = input_ids if input_ids is not None else inputs
    if input_ids is None:
        raise ConfigError("generate() needs the prompt token ids: model.generate(input_ids=ids) with ids a (B, T) "
                          "tensor, e.g. tokenizer(texts, return_tensors='pt').input_ids.")
    if isinstance(input_ids, Mapping):
        if "input_ids" not in input_ids:
            raise ConfigError(f"generate(): the prompt is a {type(input_ids).__name__} without 'input_ids' (keys: "
                              f"{', '.join(map(str, input_ids))}); pass the token ids, e.g. "
                              "model.generate(**tokenizer(texts, return_tensors='pt')).")
        if attention_mask is not None and input_ids.get("attention_mask") is not None:
            raise ConfigError("generate(): the attention mask was given twice (attention_mask= and inside the "
                              "tokenizer output passed as the prompt); pass one of them.")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    return input_ids, attention_mask


def stop_ids(eos_token_id) -> list[int]:
    """An id, a list/tuple of ids, a tensor or None -> list of ints."""
    if eos_token_id is None:
        return []
    if hasattr(eos_token_id, "tolist"):
        eos_token_id = eos_token_id.tolist()
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _number(options: dict, name: str, kind=float):
    value = options.get(name, SUPPORTED[name])
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"generate(): {name}={value!r} is not a number.") from None


def resolve(options: dict, prompt_length: int) -> GenerationSettings:
    """GenerationSettings from merged options (see merged_options) for prompts of `prompt_length` tokens
    (left padding included, as transformers counts it). Raises ConfigError for invalid values."""
    max_new, max_length = _number(options, "max_new_tokens", int), _number(options, "max_length", int)
    if max_new is None and max_length is not None:
        if max_length <= prompt_length:
            raise ConfigError(f"generate(): max_length={max_length} counts the prompt, which is already "
                              f"{prompt_length} tokens long; raise max_length or use max_new_tokens instead.")
        max_new = max_length - prompt_length
    max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new
    if max_new < 0:
        raise ConfigError(f"generate(): max_new_tokens={max_new} is invalid: use 0 or more.")
    min_new_given = _number(options, "min_new_tokens", int)
    min_length = _number(options, "min_length", int) or 0
    if min_new_given is not None and min_new_given < 0 or min_length < 0:
        raise ConfigError("generate(): min_new_tokens and min_length must be 0 or more.")
    min_new = min_new_given if min_new_given is not None else max(min_length - prompt_length, 0)
    total_min = min_new_given + prompt_length if min_new_given is not None else min_length

    do_sample = bool(options.get("do_sample", False))
    temp = _number(options, "temperature")
    k = _number(options, "top_k", int)
    p = _number(options, "top_p")
    mp = _number(options, "min_p")
    penalty = _number(options, "repetition_penalty")
    if temp is not None and temp < 0:
        raise ConfigError(f"generate(): temperature={temp} is invalid: use a positive value such as 0.7 (with "
                          f"do_sample=True), or do_sample=False for greedy decoding.")
    if p is not None and not 0 < p <= 1:
        raise ConfigError(f"generate(): top_p={p} is invalid: use a value in (0, 1]; 1 turns it off.")
    if k is not None and k < 0:
        raise ConfigError(f"generate(): top_k={k} is invalid: use 0 (off) or a positive number of tokens.")
    if mp is not None and not 0 <= mp <= 1:
        raise ConfigError(f"generate(): min_p={mp} is invalid: use a value in [0, 1], e.g. 0.1.")
    if penalty is not None and penalty <= 0:
        raise ConfigError(f"generate(): repetition_penalty={penalty} is invalid: use a positive value; 1 is off, "
                          f"above 1 discourages repeats (1.1-1.3 is typical).")
    n = _number(options, "num_return_sequences", int)
    if n < 1:
        raise ConfigError(f"generate(): num_return_sequences={n} is invalid: use 1 or more.")
    if n > 1 and not do_sample:
        raise ConfigError(f"generate(): num_return_sequences={n} needs do_sample=True (greedy decoding would give "
                          f"{n} identical rows); beam search is not supported.")
    greedy_temperature = temp == 0  # fasttune's own extension: do_sample with temperature 0 decodes greedily
    eos = stop_ids(options.get("eos_token_id"))
    pad = options.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else None
    return GenerationSettings(
        max_new_tokens=max_new, min_new_tokens=min_new, min_length_used=total_min > 0 and bool(eos),
        min_new_tokens_used=bool(min_new_given) and bool(eos), do_sample=do_sample and not greedy_temperature,
        temperature=temp if do_sample else None, top_k=k if do_sample else None, top_p=p if do_sample else None,
        min_p=mp if do_sample else None, repetition_penalty=penalty if penalty not in (None, 1.0) else None,
        num_return_sequences=n, eos_token_ids=eos, pad_token_id=None if pad is None else int(pad),
        output_scores=bool(options.get("output_scores")), output_logits=bool(options.get("output_logits")),
        return_dict_in_generate=bool(options.get("return_dict_in_generate")))


def length_and_pad_defaults(options: dict, settings: GenerationSettings) -> dict:
    """What fasttune's defaults add to a transformers generate() call (the fallback model): max_new_tokens=32 when
    no length is set anywhere (transformers would make 20 tokens), and pad_token_id = the first stop id when none
    is set (transformers does the same, with a warning)."""
    extra = {}
    if options.get("max_new_tokens") is None and options.get("max_length") is None:
        extra["max_new_tokens"] = settings.max_new_tokens
    if options.get("pad_token_id") is None and settings.pad_token_id is not None:
        extra["pad_token_id"] = settings.pad_token_id
    return extra
