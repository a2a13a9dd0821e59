"""Text generation with a KV cache, with transformers' generate() arguments and semantics.

`generate()` runs the prompt once into a preallocated KVCache, then one token per step; positions come from the
attention mask (left padding gives each row positions 0, 1, ...). Each step's last-position logits (fp32) go
through transformers' logits processors in transformers' order (see fasttune/sampling.py): repetition penalty,
the minimum-length eos suppression, the caller's `logits_processor` objects, then, only when sampling,
temperature, top-k, top-p and min-p; greedy takes the argmax, sampling draws from the softmax. Rows that produced
a stop token are padded with `pad_token_id` while the others continue; the loop ends when all rows stopped (or a
`stopping_criteria` object says so) or max_new_tokens were made. Greedy output equals transformers' token for
token. The arguments are read and checked in fasttune/generate_args.py.
"""
from __future__ import annotations

import torch

from fasttune import sampling
from fasttune.constants import AUDIO_KEYS, CROSS_KEYS, IMAGE_KEYS, VIDEO_KEYS
from fasttune.data.text_tokenizer import text_tokenizer
from fasttune.errors import ConfigError
from fasttune.generate_args import GenerationSettings, merged_options, prompt_argument, resolve, stop_ids
from fasttune.models.kv_cache import KVCache
from fasttune.models.static_decode import decode_session, graphs_wanted, release_decode_session
from fasttune.models.vision_features import image_geometry

CHECK_EVERY = 16  # tokens between two host reads of the stop state on CUDA


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, min_p: float | None = None) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or a draw after transformers' filters (temperature, top-k,
    top-p, min-p, in that order; 0 / 1 / None turn one off). temperature 0 means greedy. Returns (B,) int64."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    return sampling.next_tokens(sampling.warp(logits.float(), temperature, top_k, top_p, min_p), True, generator)


def _stop_ids(eos_token_id) -> list[int]:
    return stop_ids(eos_token_id)


def _infer_attention_mask(input_ids: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    """transformers' rule without an attention_mask: positions holding pad_token_id are padding when the prompt
    contains it and it is not a stop id; otherwise every position is attended."""
    pad = s.pad_token_id
    if pad is not None and pad not in s.eos_token_ids and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def _processors(s: GenerationSettings, custom: list, seen: list, stop_t, prompt_length: int) -> list:
    """The (input_ids, scores) -> scores steps before the sampling filters, merged with the caller's
    logits_processor as transformers merges them: a custom processor of the same class as a built-in one takes
    its place, the others run after the built-in ones, in the order given."""
    def penalty(ids, scores):
        """transformers' repetition penalty on scores (B, V) over the tokens seen so far."""
        return sampling.repetition_penalty(scores, seen[0][:, :scores.shape[-1]], s.repetition_penalty)

    def min_length(ids, scores):
        """The stop tokens' scores (B, V) at -inf until min_new_tokens tokens were generated after the prompt."""
        return sampling.suppress(scores, stop_t) if ids.shape[1] - prompt_length < s.min_new_tokens else scores

    built_in = []
    if s.repetition_penalty is not None:
        built_in.append(("RepetitionPenaltyLogitsProcessor", penalty))
    if s.min_length_used:
        built_in.append(("MinLengthLogitsProcessor", min_length))
    if s.min_new_tokens_used:
        built_in.append(("MinNewTokensLengthLogitsProcessor", min_length))
    steps, used = [], set()
    for name, fn in built_in:
        match = next((c for c in custom if _is_transformers_class(c, name)), None)
        steps.append(fn if match is None else match)
        if match is not None:
            used.add(id(match))
    return steps + [c for c in custom if id(c) not in used]


def _is_transformers_class(obj, name: str) -> bool:
    from transformers.generation import logits_process

    return type(obj) is getattr(logits_process, name)


def _check_callables(objects, what: str) -> list:
    objects = list(objects or [])
    for o in objects:
        if not callable(o):
            raise ConfigError(f"generate(): every item of {what} must be callable as f(input_ids, scores) "
                              f"(a transformers {'LogitsProcessor' if what == 'logits_processor' else 'StoppingCriteria'}"
                              f"); got {type(o).__name__}.")
    return objects


def _seen_tokens(ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab + 1) bool: which ids occur in each prompt after its leading padding (transformers'
    prompt_ignore_length); ids outside [0, vocab) land in the extra last column, which is never read."""
    ignore = (attention_mask != 0).int().argmax(dim=1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    ids = torch.where((ids < 0) | (ids >= vocab) | (positions[None] < ignore[:, None]), vocab, ids)
    return torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


def _output(sequences: torch.Tensor, s: GenerationSettings, scores: list, raw_logits: list):
    if not s.return_dict_in_generate:
        return sequences
    from transformers.generation import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores) if s.output_scores else None,
                                     logits=tuple(raw_logits) if s.output_logits else None)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
    """Prompt (B, T) int64 -> (B * num_return_sequences, T + new) int64 token ids (prompt + new tokens), or
    transformers' GenerateDecoderOnlyOutput with return_dict_in_generate=True. Batches must be LEFT-padded
    (attention_mask (B, T), 0 on the padding); without a mask, positions holding pad_token_id are padding (as in
    transformers) when it is not a stop id.

    Keyword arguments are transformers' (transformers' precedence: these > `generation_config` (a
    GenerationConfig) > `model.generation_config` > transformers' defaults; an explicit None overrides too):
    `inputs` (alias of input_ids; either may also be a tokenizer's output, a BatchEncoding/dict with `input_ids` and
    optionally `attention_mask`), `max_new_tokens` (default 32 when neither it nor `max_length`, the total length
    with the prompt, is set; max_new_tokens wins), `min_new_tokens` / `min_length` (stop ids suppressed before),
    `do_sample` (default False: greedy, and temperature/top_k/top_p/min_p are then ignored), `temperature` (0 with
    do_sample=True also decodes greedily),
    `top_k` (default 50 when sampling, 0 = off), `top_p`, `min_p`, `repetition_penalty` (over the prompt after its
    padding and the new tokens; greedy too), `num_return_sequences` (sampling only; row i's copies are adjacent;
    a prompt with images is prefilled once),
    `eos_token_id` (an id or a list of stop ids), `pad_token_id` (fills stopped rows; default: the first stop id),
    `logits_processor` (transformers LogitsProcessor objects, called as f(input_ids, scores)), `stopping_criteria`
    (StoppingCriteria objects, in addition to the stop ids and the length), `streamer` (put(ids) / end(), as
    TextStreamer: gets the prompt, then each new token), `output_scores` / `output_logits` /
    `return_dict_in_generate`. `use_cache` is accepted (the KV cache is always used), as are `tokenizer`,
    `token_type_ids`, `labels` and `synced_gpus` (no effect here; PaliGemma's whole prompt is its prefix, attending
    both ways, as its processor's prompts mark it). fasttune's own: `seed` (sampling from a private generator).

    Raises ConfigError for an unknown (misspelt) argument, for decoding modes not implemented here (num_beams > 1,
    penalty_alpha, assistant_model, prefix_allowed_tokens_fn, ...; see generate_args.py), for invalid values and for
    right-padded batches.
    """
    from fasttune.models.host_head import head_on_device, host_head

    if host_head(model) is not None and model.device.type == "cuda":  # offload_lm_head: every token reads the
        # whole head, so it comes to the GPU once for the call instead of streaming over PCIe per token
        with head_on_device(model, model.device):
            return generate(model, input_ids, attention_mask, **kwargs)
    images = _image_inputs(model, input_ids, kwargs)
    input_ids, attention_mask = prompt_argument(input_ids, attention_mask, kwargs)
    generation_config = kwargs.pop("generation_config", None)
    seed, streamer = kwargs.pop("seed", None), kwargs.pop("streamer", None)
    custom_processors = _check_callables(kwargs.pop("logits_processor", None), "logits_processor")
    criteria = _check_callables(kwargs.pop("stopping_criteria", None), "stopping_criteria")
    model_config = getattr(model, "generation_config", None)
    options = merged_options(model_config, generation_config, kwargs,
                             default_eos=model.arch.eos_token_id if model_config is None else None)

    device = model.device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    s = resolve(options, input_ids.shape[1])
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, s)
    attention_mask = torch.as_tensor(attention_mask, device=device).long()
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                          f"{tuple(input_ids.shape)}.")
    if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        raise ConfigError("generate() needs LEFT-padded batches (the last column is padding in some row); set "
                          "tokenizer.padding_side = 'left'.")
    distinct = input_ids, attention_mask  # the prompts as given: with images, each is prefilled once
    if s.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(s.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(s.num_return_sequences, dim=0)
    if s.max_new_tokens == 0:
        return _output(input_ids, s, [], [])
    if streamer is not None:
        streamer.put(input_ids.cpu())

    b, t = input_ids.shape
    n_new = s.max_new_tokens
    pad_token_id = s.pad_token_id if s.pad_token_id is not None else 0
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    padded = not bool(attention_mask.all())
    # The full mask for prompt + all new tokens, sliced per step; new positions are always attended.
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(b, n_new)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = position_ids[:, -1:] + 1
    stop_t = torch.tensor(s.eos_token_ids, device=device) if s.eos_token_ids else None
    seq = torch.cat([input_ids, input_ids.new_full((b, n_new), pad_token_id)], dim=1)
    seen = [None]  # the repetition penalty's token set, filled once the vocabulary size is known
    steps = _processors(s, custom_processors, seen, stop_t, t)
    scores_out, logits_out = [], []

    was_training = model.training
    model.eval()
    try:
        rows = None
        if images:  # a vision-language model's prompt: image features in place, multimodal RoPE positions
            prompt, logits, rows, deltas = _prefill_with_images(model, *distinct, images, s.num_return_sequences,
                                                                padded)
            next_pos = next_pos + deltas  # text after the images continues past them
        else:
            prompt, logits, rows = _prefill(model, input_ids, full_mask[:, :t] if padded else None, position_ids)
        vocab = logits.shape[-1]
        if s.repetition_penalty is not None:
            seen[0] = _seen_tokens(input_ids, attention_mask, vocab)
        decode = decode_session(model, b, t + n_new, graphs_wanted(model, device)).start(prompt, rows, full_mask)
        del prompt
        check_every = _stop_check_interval(device, streamer is not None or bool(criteria))
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        alive = []  # per step: whether any row was still unfinished after it
        cur = t
        # Plain greedy decoding needs no fp32 copy of the logits (the argmax is the same), and without stop
        # conditions every row stays unfinished: at batch 1 each kernel saved is ~1% of a 1B model's step.
        plain_greedy = not (steps or s.do_sample or s.output_scores or s.output_logits)
        stoppable = stop_t is not None or bool(criteria)
        for step in range(n_new):
            if plain_greedy:  # after the first, each step's graph has computed the argmax (and fed it back)
                token = logits.argmax(dim=-1) if step == 0 else decode.argmax
            else:
                raw = logits.float()
                scores = raw
                for fn in steps:
                    scores = fn(seq[:, :cur], scores)
                if s.do_sample:
                    scores = sampling.warp(scores, s.temperature, s.top_k, s.top_p, s.min_p)
                token = sampling.next_tokens(scores, s.do_sample, generator)
                if s.output_scores:
                    scores_out.append(scores)
                if s.output_logits:
                    logits_out.append(raw)
            # Stopped rows show padding; they still feed their own (ignored) token, as pad may not be a valid id.
            emitted = torch.where(unfinished, token, torch.full_like(token, pad_token_id)) if stoppable else token
            seq[:, cur] = emitted
            cur += 1
            if seen[0] is not None:
                in_vocab = (emitted >= 0) & (emitted < vocab)
                seen[0].scatter_(1, torch.where(in_vocab, emitted, vocab)[:, None], True)
            if streamer is not None:
                streamer.put(emitted.to("cpu", copy=True))  # emitted may be the decode step's own buffer
            if stop_t is not None:
                unfinished &= ~torch.isin(emitted, stop_t)
            if criteria and plain_greedy:  # criteria see transformers' fp32 scores
                scores = logits.float()
            for criterion in criteria:
                unfinished &= ~torch.as_tensor(criterion(seq[:, :cur], scores), device=device).bool()
            if step == n_new - 1:
                break
            if stop_t is not None or criteria:
                alive.append(unfinished.any())
                if (step + 1) % check_every == 0:
                    done = (~torch.stack(alive)).nonzero()
                    if done.numel():  # all rows stopped at that step: the output ends there, as transformers'
                        cur = t + int(done[0, 0]) + 1
                        break
            if plain_greedy and step > 0:  # the step's own argmax and next position are its inputs already
                logits = decode()
            else:
                logits = decode(token[:, None], next_pos + step)
        if alive and cur == t + n_new:  # stops after the last check
            done = (~torch.stack(alive)).nonzero()
            if done.numel():
                cur = t + int(done[0, 0]) + 1
    finally:
        model.train(was_training)
        if was_training:  # sampling inside training (GRPO): the KV cache and graphs give their memory back
            release_decode_session(model)
        if streamer is not None:
            streamer.end()
    made = cur - t
    return _output(seq[:, :cur], s, scores_out[:made], logits_out[:made])


def _stop_check_interval(device: torch.device, host_per_token: bool) -> int:
    """Tokens between two reads of the stop state on the host. Each read stalls the GPU's queue, so on CUDA it is
    read every CHECK_EVERY tokens (rows that stopped meanwhile only add padding, which is cut off), unless a
    streamer or stopping criteria bring every token to the host anyway; on the CPU (no queue to stall, and
    extra steps cost compute) every token."""
    return CHECK_EVERY if device.type == "cuda" and not host_per_token else 1


def _prefill_with_images(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict, copies: int,
                         padded: bool):
    """Run the prompts (B, T) with their images (the processor's keys, in row order) into a new KVCache: (cache,
    last-position logits (B x copies, V), rows: which prompt each of the B x copies rows continues (None for
    copies 1), rope deltas (B x copies, 1): what the positions of the new tokens add). Each prompt and its images run
    once, however many sequences it returns."""
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    b, t = input_ids.shape
    cache = KVCache(model.arch, b, t, model.dtype, device)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in images.items()}
    # Qwen's grids, Pixtral's / LLaVA-NeXT's sizes (LLaVA-OneVision's with its images per row), Gemma 4's positions
    geometry = image_geometry(moved.get("image_grid_thw"), moved.get("image_sizes"), moved.get("image_position_ids"),
                              None, moved.get("batch_num_images"))
    inputs = model.multimodal_inputs(input_ids, moved.get("pixel_values"), geometry, attention_mask,
                                     {k: moved.get(k) for k in (*VIDEO_KEYS, *AUDIO_KEYS, *CROSS_KEYS)})
    if inputs["position_ids"] is None:  # plain positions (Qwen's are 3-axis), counted from each row's first token
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    deltas = inputs.pop("rope_deltas").to(device)
    logits = model(attention_mask=attention_mask if padded else None, past_key_values=cache, logits_to_keep=1,
                   **inputs).logits[:, -1]
    if copies == 1:
        return cache, logits, None, deltas
    rows = torch.arange(b, device=device).repeat_interleave(copies)
    return cache, logits.index_select(0, rows), rows, deltas.index_select(0, rows)


def _prefill(model, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor):
    """Run the prompts into a new KVCache of their length: (cache, last-position logits (B, V), rows). Identical
    rows (GRPO's and num_return_sequences' copies of a prompt) are run once: then the cache holds the distinct
    prompts and rows (B,) int64 says which one each row continues (None when every row was run)."""
    b, t = input_ids.shape
    rows = input_ids if attention_mask is None else torch.cat([input_ids, attention_mask], dim=1)
    index = inverse = None
    if b > 1:
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if unique.shape[0] < b:
            first = torch.full((unique.shape[0],), b, dtype=torch.long, device=rows.device)
            index = first.scatter_reduce(0, inverse, torch.arange(b, device=rows.device), "amin")
    if index is None:
        cache = KVCache(model.arch, b, t, model.dtype, input_ids.device)
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                       logits_to_keep=1).logits[:, -1]
        return cache, logits, None
    sub = lambda x: None if x is None else x.index_select(0, index)  # noqa: E731
    cache = KVCache(model.arch, len(index), t, model.dtype, input_ids.device)
    logits = model(sub(input_ids), attention_mask=sub(attention_mask), position_ids=sub(position_ids),
                   past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits.index_select(0, inverse), inverse


def _image_inputs(model, prompt, kwargs: dict) -> dict:
    """pixel_values / image_grid_thw / image_sizes and the video keys (constants.VIDEO_KEYS) from the keywords or from a
    processor output passed as the prompt (popped); refused (ConfigError) for a model without a vision tower, or
    grids without their pixels. mm_token_type_ids is dropped (image and video tokens are found by id)."""
    from collections.abc import Mapping

    keys = (*IMAGE_KEYS, *VIDEO_KEYS, *AUDIO_KEYS)
    kwargs.pop("mm_token_type_ids", None)
    images = {k: value for k in keys if (value := kwargs.pop(k, None)) is not None}
    if isinstance(prompt, Mapping):
        images.update({k: prompt[k] for k in keys if prompt.get(k) is not None})
    if images and getattr(model, "family", None) is None:
        raise ConfigError("generate(): pixel_values or input_features were given, but this model has no vision "
                          "tower.")
    for grid, pixels in (("image_grid_thw", "pixel_values"), ("image_sizes", "pixel_values"),
                         ("image_position_ids", "pixel_values"), ("video_grid_thw", "pixel_values_videos"),
                         ("input_features_mask", "input_features")):
        if grid in images and pixels not in images:
            raise ConfigError(f"generate(): {grid} without {pixels}; pass the processor's output whole.")
    return images


def chat_prompt_ids(tokenizer, messages: list[dict], chat: bool = True) -> list[int]:
    """Token ids of a conversation rendered with the chat template (plus the assistant prefix), or of the last
    message's plain text when the tokenizer has no template (or chat=False)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"]
    return text_tokenizer(tokenizer)(messages[-1]["content"])["input_ids"]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's eos and pad ids (the CLI's samples stop at either), plus the model config's eos ids."""
    ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    if model is not None:
        ids += _stop_ids(model.arch.eos_token_id)
    return sorted({i for i in ids if i is not None})


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows of different lengths, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def new_tokens(row: torch.Tensor, prompt_len: int, stops) -> list[int]:
    """The generated ids of one output row, up to (not including) the first stop token."""
    out = []
    for t in row[prompt_len:].tolist():
        if t in stops:
            break
        out.append(t)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                  chat: bool = True, seed: int = 0) -> str:
    """Continue `prompt` (as a user turn through the chat template when the tokenizer has one)."""
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], chat)
    stops = stop_token_ids(tokenizer)
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                   temperature=temperature if temperature > 0 else 1.0, top_k=0, eos_token_id=stops, seed=seed)
    return tokenizer.decode(new_tokens(out[0], len(ids), stops), skip_special_tokens=True)


def generate_vision_text(model, processor, contents: list, image_dir=None, max_new_tokens: int = 32,
                         streamer=None, **sampling) -> list[str]:
    """Replies of a vision-language model to user turns (per row a string or a list of text / image items; image
    paths relative to image_dir), greedy unless sampling options are given. Returns one string per row."""
    batch = processor.prompt_inputs(contents, image_dir)
    stops = stop_token_ids(processor, model)
    out = generate(model, batch, max_new_tokens=max_new_tokens, eos_token_id=stops, streamer=streamer,
                   **{"do_sample": False, **sampling})
    width = batch["input_ids"].shape[1]
    return [processor.decode(new_tokens(row, width, stops), skip_special_tokens=True) for row in out]
