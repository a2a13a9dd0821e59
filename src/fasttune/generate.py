"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stop tokens, left-padded batches.

`generate()` follows transformers' `generate()` semantics so that greedy outputs agree token for token: the prompt
is run once into a preallocated KVCache, then one token per step; positions come from the attention mask (left
padding gives each row positions 0, 1, ...), rows that produced a stop token are padded with `pad_token_id` while
the others continue, and the loop ends when all rows stopped or `max_new_tokens` were made.
"""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from (B, V) logits. Filters in transformers' order: temperature, top-k, top-p."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best one always stays.
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _check(max_new_tokens, temperature, top_p, top_k):
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: use 0 or more.")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is invalid: use 0 (greedy) or a positive value such as 0.7.")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} is invalid: use a value in (0, 1]; 1 turns it off.")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} is invalid: use 0 (off) or a positive number of tokens.")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
             use_cache: bool = True, streamer=None) -> torch.Tensor:
    """Prompt (B, T) -> (B, T + new) token ids. Batches must be LEFT-padded (attention_mask 0 on the padding).

    eos_token_id: an id or a list of stop ids (default: the model config's eos). A stopped row is padded with
    pad_token_id (default: the first stop id). seed makes sampling reproducible (a private generator).
    `use_cache` is accepted for transformers compatibility; the cache is always used. `streamer`: an object with
    put(ids) / end() as transformers' TextStreamer (gets the prompt, then each new token, then end()).
    """
    from fasttune.models.decoder import KVCache

    _check(max_new_tokens, temperature, top_p, top_k)
    device = model.device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    stops = _stop_ids(eos_token_id if eos_token_id is not None else model.config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask, device=device).long()
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                          f"{tuple(input_ids.shape)}.")
    if b > 1 and bool((attention_mask[:, -1] == 0).any()):
        raise ConfigError("generate() needs LEFT-padded batches (the last column is padding in some row); set "
                          "tokenizer.padding_side = 'left'.")
    if max_new_tokens == 0:
        return input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    padded = not bool(attention_mask.all())
    # The full mask for prompt + all new tokens, sliced per step; new positions are always attended.
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = position_ids[:, -1:] + 1
    stop_t = torch.tensor(stops, device=device) if stops else None

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config, b, t + max_new_tokens, model.dtype, device)
        logits = model(input_ids, attention_mask=full_mask[:, :t] if padded else None, position_ids=position_ids,
                       past_key_values=cache, logits_to_keep=1).logits[:, -1]
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        out = [input_ids]
        for step in range(max_new_tokens):
            token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            # Stopped rows show padding; they still feed their own (ignored) token, as pad may not be a valid id.
            out.append(torch.where(unfinished, token, torch.full_like(token, pad_token_id))[:, None])
            if streamer is not None:
                streamer.put(out[-1][:, 0].cpu())
            if stop_t is not None:
                unfinished &= ~torch.isin(token, stop_t)
                if not bool(unfinished.any()):
                    break
            if step == max_new_tokens - 1:
                break
            cur = t + step + 1
            logits = model(token[:, None], attention_mask=full_mask[:, :cur] if padded else None,
                           position_ids=next_pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    return torch.cat(out, dim=1)


def chat_prompt_ids(tokenizer, messages: list[dict], chat: bool = True) -> list[int]:
    """Token ids of a conversation rendered with the chat template (plus the assistant prefix), or of the last
    message's plain text when the tokenizer has no template (or chat=False)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(messages[-1]["content"])["input_ids"]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's eos and pad ids (the CLI's samples stop at either), plus the model config's eos ids."""
    ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    if model is not None:
        ids += _stop_ids(model.config.eos_token_id)
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
                   temperature=temperature if temperature > 0 else 1.0, eos_token_id=stops, seed=seed)
    return tokenizer.decode(new_tokens(out[0], len(ids), stops), skip_special_tokens=True)
