"""New tokens: add them to the tokenizer and grow embed_tokens / lm_head (and config.vocab_size) to match.

Each new token's row (in the embeddings and, when untied, in lm_head) starts as the mean of the other rows, a
neutral start that keeps the model's outputs sensible until training moves it. Ids that fall inside an already
larger matrix (vocabularies padded past the tokenizer) are re-initialised the same way.

An adapter trained after adding tokens is loaded back onto the original base: the tokenizer saved with the adapter
names the added tokens (those the base tokenizer lacks), and the base is grown the same way before the adapter
loads, so the trained modules_to_save rows fit and every other row is what it was in training.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.errors import ConfigError


def add_new_tokens(model, tokenizer, new_tokens, special: bool = True) -> list[int]:
    """Add `new_tokens` (strings) to `tokenizer` and the model; returns the ids of the tokens that were new."""
    if isinstance(new_tokens, str):
        new_tokens = [new_tokens]
    if not new_tokens or not all(isinstance(t, str) and t for t in new_tokens):
        raise ConfigError(f"add_new_tokens needs a list of non-empty strings; got {new_tokens!r}.")
    _check_no_lora(model)
    known = tokenizer.get_vocab()
    fresh = [t for t in dict.fromkeys(new_tokens) if t not in known]
    if not fresh:
        return []
    tokenizer.add_tokens(fresh, special_tokens=special)
    ids = tokenizer.convert_tokens_to_ids(fresh)
    init_token_rows(model, ids)
    return ids


def restore_added_tokens(model, base_tokenizer, adapter_tokenizer) -> list[int]:
    """Grow `model` for the tokens `adapter_tokenizer` has beyond `base_tokenizer` (see the module docstring)."""
    if base_tokenizer is not None:
        base = base_tokenizer.get_vocab()
        ids = sorted(i for t, i in adapter_tokenizer.get_vocab().items() if t not in base)
    else:
        ids = list(range(model.arch.vocab_size + model.arch.extra_embeddings, len(adapter_tokenizer)))
    if ids:
        init_token_rows(model, ids)
    return ids


def init_token_rows(model, ids: list[int]):
    """Rows `ids` of the embeddings (and untied lm_head) := mean of the other rows; grows the matrices to fit."""
    _check_no_lora(model)
    from fasttune.models.fallback import FallbackModel

    if isinstance(model, FallbackModel):
        return _init_rows_transformers(model, ids)
    emb, head = model.model.embed_tokens, model.lm_head
    size = max(emb.weight.shape[0], max(ids) + 1)
    emb.weight = nn.Parameter(_with_rows(emb.weight, size, ids), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = size
    if model.arch.tie_embeddings:
        model.tie_weights()
    else:
        head.weight = nn.Parameter(_with_rows(head.weight, size, ids), requires_grad=head.weight.requires_grad)
    head.out_features = size
    model.arch.vocab_size = size
    model.config.vocab_size = size


def drop_token_rows(model, size: int):
    """Keep the first `size` (>= 1) rows of our model's embeddings and untied lm_head, as transformers'
    resize_token_embeddings shrinks them. Raises ConfigError after get_peft_model or for size < 1."""
    _check_no_lora(model)
    if size < 1:
        raise ConfigError(f"resize_token_embeddings({size}): the embedding needs at least one row.")
    emb, head = model.model.embed_tokens, model.lm_head
    emb.weight = nn.Parameter(emb.weight.detach()[:size].clone(), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = size
    if model.arch.tie_embeddings:
        model.tie_weights()
    else:
        head.weight = nn.Parameter(head.weight.detach()[:size].clone(), requires_grad=head.weight.requires_grad)
    head.out_features = size
    model.arch.vocab_size = size
    model.config.vocab_size = size


def _init_rows_transformers(model, ids: list[int]):
    base = model.transformers_model
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    tied = out is None or out.weight is inp.weight
    size = max(inp.weight.shape[0], max(ids) + 1)
    rows = {"in": _with_rows(inp.weight, size, ids)}
    if not tied:
        rows["out"] = _with_rows(out.weight, size, ids)
    base.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        base.get_input_embeddings().weight.copy_(rows["in"])
        if not tied:
            base.get_output_embeddings().weight.copy_(rows["out"])
    model.arch.vocab_size = size


def _with_rows(weight: torch.Tensor, size: int, ids: list[int]) -> torch.Tensor:
    old = weight.detach()
    keep = torch.ones(old.shape[0], dtype=torch.bool, device=old.device)
    keep[[i for i in ids if i < old.shape[0]]] = False
    mean = old[keep].float().mean(dim=0).to(old.dtype)
    new = torch.empty(size, old.shape[1], dtype=old.dtype, device=old.device)
    new[:old.shape[0]] = old
    new[ids] = mean
    return new


def _check_no_lora(model):
    """Refuse (ConfigError) a change of the vocabulary after get_peft_model, or on an embedding with rows past the
    vocabulary (Llama 3.2 Vision's 8, <|image|> among them), whose layout transformers does not resize either."""
    if model.arch.extra_embeddings:
        raise ConfigError(f"This {model.arch.model_type} model's embedding has {model.arch.extra_embeddings} rows "
                          f"past its {model.arch.vocab_size}-token vocabulary (<|image|> among them), which fasttune "
                          f"does not resize; train without adding tokens (use the tokenizer's reserved special "
                          f"tokens instead).")
    if model.lora_settings is not None:
        raise ConfigError("Add new tokens before FastLanguageModel.get_peft_model: the adapter is built on the "
                          "embedding sizes, and the new rows are trained through modules_to_save=['embed_tokens', "
                          "'lm_head'].")
