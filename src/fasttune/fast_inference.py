"""vLLM-shaped generation for scripts written for Unsloth's `fast_inference=True` (the GRPO notebooks), without vLLM.

`model.fast_generate(prompts, sampling_params, lora_request=...)` takes vLLM's arguments and returns vLLM's result
shape (`RequestOutput`-like objects with `.prompt` and `.outputs[i].text / .token_ids / .finish_reason`), but runs
fasttune's own KV-cache `generate` (fasttune/generate.py): one left-padded batch of all prompts, transformers'
sampling filters (fasttune/sampling.py), CUDA-graph decode steps (models/static_decode.py), the `n` samples of a
prompt sharing its prefill. There is no continuous batching: finished rows keep their slot until the batch ends.

`model.save_lora(path)` writes the current adapter (PEFT format) and `model.load_lora(path)` returns a `LoraRequest`
handle holding that adapter's tensors; passed as `lora_request=`, those tensors are copied into the model's LoRA
layers for the call and the model's own ones are put back afterwards, so training continues where it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import ConfigError

# The fields read from a SamplingParams object or dict, with vLLM's defaults.
SUPPORTED = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 16, "min_tokens": 0,
             "stop": None, "stop_token_ids": None, "seed": None, "repetition_penalty": 1.0, "ignore_eos": False,
             "include_stop_str_in_output": False, "skip_special_tokens": True}
# vLLM fields that do not change which tokens are drawn or how the text reads: ignored.
IGNORED = {"detokenize", "spaces_between_special_tokens", "output_kind", "extra_args", "output_text_buffer_length",
           "flat_logprobs"}
# vLLM fields not implemented here: accepted at vLLM's default (what a SamplingParams object always carries), any
# other value is a ConfigError rather than a silently different sampling.
UNSUPPORTED = {"best_of": None, "presence_penalty": 0.0, "frequency_penalty": 0.0, "bad_words": None,
               "logprobs": None, "prompt_logprobs": None, "logits_processors": None, "guided_decoding": None,
               "structured_outputs": None, "logit_bias": None, "allowed_token_ids": None,
               "truncate_prompt_tokens": None}


@dataclass
class CompletionOutput:
    """One sample (vLLM's CompletionOutput): `text` (str), `token_ids` (list[int]: the new tokens, the stop token
    or the tokens that completed a stop string included, as vLLM keeps them), `finish_reason` ("stop": a stop
    token or stop string; "length": max_tokens reached), `stop_reason` (the stop string or stop token id, or
    None), `index` (0..n-1)."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: Any = None
    cumulative_logprob: float | None = None
    logprobs: Any = None


@dataclass
class RequestOutput:
    """The result for one prompt (vLLM's RequestOutput): `prompt` (str), `prompt_token_ids` (list[int]),
    `outputs` (list of n CompletionOutput), `finished` (always True)."""
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class LoraRequest:
    """An adapter read by `model.load_lora(path)`, for `fast_generate(..., lora_request=...)`. `tensors` are the
    adapter's PEFT-named tensors (CPU), `settings` its LoraSettings; `lora_name` / `lora_int_id` / `lora_path` are
    vLLM LoRARequest's attribute names."""
    lora_name: str
    lora_int_id: int
    lora_path: str
    settings: Any = None
    tensors: dict = field(default_factory=dict, repr=False)


def read_sampling_params(sampling_params) -> dict:
    """A vLLM SamplingParams-like object (attributes read by name) or a dict -> the SUPPORTED fields (vLLM's
    defaults filled in). None gives vLLM's defaults. Raises ConfigError for a field vLLM does not have (a typo),
    for a vLLM field not implemented here set to a non-default value, and for invalid values."""
    if sampling_params is None:
        given = {}
    elif isinstance(sampling_params, dict):
        given = dict(sampling_params)
    else:
        names = getattr(type(sampling_params), "__struct_fields__", None)  # vLLM's SamplingParams is a msgspec Struct
        if names is None:
            names = [n for n in getattr(sampling_params, "__dict__", {})]
            names += [n for n in getattr(type(sampling_params), "__dataclass_fields__", {}) if n not in names]
        given = {n: getattr(sampling_params, n) for n in names if not n.startswith("_")}
        for n in SUPPORTED:  # plain objects with properties or class attributes
            if n not in given and hasattr(sampling_params, n):
                given[n] = getattr(sampling_params, n)
    out = dict(SUPPORTED)
    for name, value in given.items():
        if name in SUPPORTED:
            out[name] = SUPPORTED[name] if value is None and name in ("top_k", "min_p", "repetition_penalty",
                                                                      "temperature", "top_p", "n") else value
        elif name in IGNORED:
            continue
        elif name in UNSUPPORTED:
            if value != UNSUPPORTED[name] and not (name == "best_of" and value in (None, given.get("n", 1))):
                raise ConfigError(f"fast_generate(): sampling_params.{name}={value!r} is not supported by fasttune's "
                                  f"generation; leave it at vLLM's default ({UNSUPPORTED[name]!r}).")
        else:
            import difflib

            close = difflib.get_close_matches(name, list(SUPPORTED) + list(IGNORED) + list(UNSUPPORTED), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"fast_generate(): unknown sampling field '{name}' (not a vLLM SamplingParams field)."
                              f"{hint} Supported: {', '.join(sorted(SUPPORTED))}.")
    _check(out)
    return out


def _check(p: dict) -> None:
    """Raise ConfigError naming the first field of the sampling settings `p` whose value is out of range."""
    def bad(name, rule):
        """ConfigError: sampling_params.`name` breaks `rule` (the fix, in words)."""
        raise ConfigError(f"fast_generate(): sampling_params.{name}={p[name]!r} is invalid: {rule}.")

    if not isinstance(p["n"], int) or p["n"] < 1:
        bad("n", "use 1 or more")
    if p["temperature"] < 0:
        bad("temperature", "use 0 (greedy) or more")
    if not 0 < p["top_p"] <= 1:
        bad("top_p", "use a value in (0, 1]")
    if not isinstance(p["top_k"], int) or p["top_k"] < -1:
        bad("top_k", "use -1 or 0 (off) or a positive number of tokens")
    if not 0 <= p["min_p"] <= 1:
        bad("min_p", "use a value in [0, 1]")
    if p["repetition_penalty"] <= 0:
        bad("repetition_penalty", "use a positive value; 1 is off")
    if p["max_tokens"] is not None and (not isinstance(p["max_tokens"], int) or p["max_tokens"] < 1):
        bad("max_tokens", "use 1 or more (or None: up to the model's max_seq_length)")
    if isinstance(p["stop"], str):
        p["stop"] = [p["stop"]]
    p["stop"] = [s for s in (p["stop"] or []) if s]
    if not all(isinstance(s, str) for s in p["stop"]):
        bad("stop", "use a string or a list of strings")
    p["stop_token_ids"] = [int(i) for i in (p["stop_token_ids"] or [])]


class _StopStrings:
    """A stopping criterion for fasttune.generate: a row stops once its new text contains one of `stops`."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int, skip_special_tokens: bool):
        self.tokenizer, self.stops, self.width, self.skip = tokenizer, stops, prompt_width, skip_special_tokens
        self.longest = max(len(s) for s in stops)

    def __call__(self, input_ids: torch.Tensor, scores) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width:].tolist():
            # Only the tail can hold a newly completed stop string; a few tokens cover its characters.
            tail = self.tokenizer.decode(row[-(self.longest + 4):], skip_special_tokens=self.skip)
            done.append(any(s in tail for s in self.stops))
        return torch.tensor(done, dtype=torch.bool)


def fast_generate(model, prompts, sampling_params=None, lora_request=None, use_tqdm=True, tokenizer=None,
                  **kwargs) -> list[RequestOutput]:
    """vLLM's `LLM.generate` on a fasttune model. See CausalLM.fast_generate for the arguments.

    prompts: str or list[str], text as it goes to the model (already chat-formatted); tokenized with special tokens
    added (BOS) unless the text already starts with the tokenizer's bos_token. tokenizer: default the one
    from_pretrained loaded (`model.fast_tokenizer`). Returns one RequestOutput per prompt, in order.

    Raises ConfigError for an unknown keyword, bad sampling fields (see read_sampling_params), a model without a
    remembered tokenizer and no `tokenizer=`, or prompts that are not strings."""
    from fasttune.generate import left_pad, stop_token_ids

    if kwargs:
        raise ConfigError(f"fast_generate() got an unknown argument '{next(iter(kwargs))}'; it takes prompts, "
                          f"sampling_params, lora_request, use_tqdm and tokenizer.")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "fast_tokenizer", None)
    if tokenizer is None:
        raise ConfigError("fast_generate() needs the tokenizer: load the model with FastLanguageModel.from_pretrained "
                          "(which remembers it) or pass tokenizer=.")
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("fast_generate(): prompts must be a string or a non-empty list of strings (text already "
                          "formatted, e.g. tokenizer.apply_chat_template(messages, tokenize=False, "
                          "add_generation_prompt=True)).")
    p = read_sampling_params(sampling_params)
    rows = [_encode(tokenizer, text) for text in prompts]
    width = max(len(r) for r in rows)
    max_new = p["max_tokens"]
    if max_new is None:
        limit = getattr(model, "max_seq_length", None)
        if not limit or limit <= width:
            raise ConfigError("fast_generate(): max_tokens=None needs the model's max_seq_length above the prompt "
                              "length; set max_tokens.")
        max_new = limit - width
    stops = [] if p["ignore_eos"] else stop_token_ids(tokenizer, model)
    stops = sorted(set(stops) | set(p["stop_token_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    ids, mask = left_pad(rows, pad_id)
    greedy = p["temperature"] == 0
    n = 1 if greedy else p["n"]
    args = dict(max_new_tokens=max_new, min_new_tokens=p["min_tokens"] or None, do_sample=not greedy,
                temperature=p["temperature"] if not greedy else 1.0, top_k=max(p["top_k"], 0), top_p=p["top_p"],
                min_p=p["min_p"] or None, repetition_penalty=p["repetition_penalty"], num_return_sequences=n,
                eos_token_id=stops or None, pad_token_id=pad_id, seed=p["seed"])
    if p["stop"]:
        args["stopping_criteria"] = [_StopStrings(tokenizer, p["stop"], width, p["skip_special_tokens"])]
    with _adapter(model, lora_request):
        out = model.generate(ids, attention_mask=mask, **args)
    results = []
    for i, text in enumerate(prompts):
        samples = []
        for j in range(p["n"]):
            row = out[i * n + (0 if greedy else j), width:].tolist()
            samples.append(_completion(j, row, tokenizer, stops, p))
        results.append(RequestOutput(str(i), text, rows[i], samples))
    return results


def _encode(tokenizer, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return text_tokenizer(tokenizer)(text, add_special_tokens=special)["input_ids"]


def _completion(index: int, row: list[int], tokenizer, stops: list[int], p: dict) -> CompletionOutput:
    """One output row (new tokens, padded after a stop) -> CompletionOutput, cut at the first stop token and then
    at the first stop string."""
    tokens, reason, stop_reason = [], "length", None
    for t in row:
        tokens.append(t)
        if t in stops:
            reason, stop_reason = "stop", t
            break
    kept = tokens[:-1] if reason == "stop" else tokens
    text = tokenizer.decode(kept, skip_special_tokens=p["skip_special_tokens"])
    hits = [(text.find(s), s) for s in p["stop"] if s in text]
    if hits:
        at, s = min(hits)
        text = text[:at + len(s)] if p["include_stop_str_in_output"] else text[:at]
        reason, stop_reason = "stop", s
        # The tokens up to the one that completed the stop string.
        for k in range(1, len(kept) + 1):
            if s in tokenizer.decode(kept[:k], skip_special_tokens=p["skip_special_tokens"]):
                tokens = kept[:k]
                break
    return CompletionOutput(index, text, tokens, reason, stop_reason)


def save_lora(model, path) -> Path:
    """Write the model's current LoRA adapter to `path` (adapter_config.json + adapter_model.safetensors, PEFT
    format). Raises ConfigError when the model has no adapter."""
    from fasttune.peft.adapter_io import save_adapter

    return save_adapter(model, path)


_next_id = [0]


def load_lora(model, path, load_tensors: bool = True) -> LoraRequest:
    """Read a saved adapter folder into a LoraRequest handle (tensors on the CPU). The model is not changed.
    Raises ModelLoadError for a missing or invalid adapter."""
    from fasttune.file_readers import load_safetensors
    from fasttune.peft.adapter_io import ADAPTER_FIX, WEIGHTS_NAME, read_adapter_config, settings_from_peft_config
    from fasttune.errors import ModelLoadError

    folder = Path(path)
    settings = settings_from_peft_config(read_adapter_config(folder))
    if not (folder / WEIGHTS_NAME).exists():
        raise ModelLoadError(f"{folder} has no {WEIGHTS_NAME}; was the adapter saved completely?")
    tensors = load_safetensors(folder / WEIGHTS_NAME, fix=ADAPTER_FIX) if load_tensors else {}
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    _next_id[0] += 1
    return LoraRequest(folder.name, _next_id[0], str(folder), settings, tensors)


class _adapter:
    """Context manager: the request's LoRA tensors (and scaling) in the model's LoRA layers, the model's own put
    back on exit. A vLLM LoRARequest (anything with `lora_path`) is read from its folder first."""

    def __init__(self, model, request):
        self.model, self.request, self.saved = model, request, None

    def __enter__(self):
        request = self.request
        if request is None:
            return self
        from fasttune.peft.adapter_io import adapter_state_dict
        from fasttune.peft.lora import lora_layers

        if getattr(self.model, "lora_settings", None) is None:
            raise ConfigError("fast_generate(lora_request=...) swaps the adapter's weights into the model's LoRA "
                              "layers, and this model has none: call FastLanguageModel.get_peft_model(model, ...) "
                              "with the adapter's settings first.")
        if not isinstance(request, LoraRequest):
            path = getattr(request, "lora_path", None) or getattr(request, "path", None)
            if path is None:
                raise ConfigError(f"fast_generate(): lora_request must come from model.load_lora(path) (or be a "
                                  f"vLLM LoRARequest); got {type(request).__name__}.")
            request = load_lora(self.model, path)
        own = adapter_state_dict(self.model)
        missing, unexpected = sorted(set(own) - set(request.tensors)), sorted(set(request.tensors) - set(own))
        if missing or unexpected:
            raise ConfigError(f"The adapter {request.lora_path} does not fit this model's LoRA layers: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}. Use the same target_modules (and "
                              f"modules_to_save) in get_peft_model as the adapter was trained with.")
        for k, t in own.items():
            if t.shape != request.tensors[k].shape:
                raise ConfigError(f"The adapter {request.lora_path}: '{k}' has shape "
                                  f"{tuple(request.tensors[k].shape)}, this model's LoRA layer "
                                  f"{tuple(t.shape)} (a different rank r?); use the adapter's r in get_peft_model.")
        layers = [layer for _, layer in lora_layers(self.model)]
        self.saved = ({k: t.clone() for k, t in own.items()}, own, [(layer, layer.scaling) for layer in layers])
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(request.tensors[k].to(t.dtype))
        for layer in layers:
            layer.scaling = request.settings.scaling
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            backup, own, scalings = self.saved
            with torch.no_grad():
                for k, t in own.items():
                    t.copy_(backup[k])
            for layer, scaling in scalings:
                layer.scaling = scaling
        return False
