"""The logits processors of generation, with transformers' formulas (generation/logits_process.py), as functions.

Each takes `scores` (B, V) float32 (the last position's logits) and returns a new (B, V) tensor; filtered
entries become -inf. generate.py applies them in transformers' order (`_get_logits_processor`):
repetition penalty, minimum length (eos suppressed), the caller's own `logits_processor` objects, then only when
sampling: temperature, top-k, top-p, min-p. `next_tokens` picks argmax (greedy) or draws from softmax (sampling).
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens marked in `seen` (B, V) bool get score * penalty when negative, score / penalty otherwise (once per
    token however often it occurred), as RepetitionPenaltyLogitsProcessor."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def suppress(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Scores of `token_ids` (1-D int64) set to -inf in every row (MinLength/MinNewTokens' eos suppression)."""
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    return torch.where(torch.isin(vocab, token_ids), NEG_INF, scores)


def temperature(scores: torch.Tensor, value: float) -> torch.Tensor:
    """scores / value (TemperatureLogitsWarper); value > 0."""
    return scores / value


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k best scores per row, and every score tied with the k-th (TopKLogitsWarper); k >= 1."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of best tokens holding at least p of the probability (TopPLogitsWarper): in
    ascending order, tokens whose cumulative probability is <= 1 - p are dropped; the best token always stays."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def min_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Drops tokens whose probability is below p times the best token's (MinPLogitsWarper); the best stays."""
    probs = torch.softmax(scores, dim=-1)
    drop = probs < p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return scores.masked_fill(drop, NEG_INF)


def warp(scores: torch.Tensor, temperature_value: float | None = None, top_k_value: int | None = None,
         top_p_value: float | None = None, min_p_value: float | None = None) -> torch.Tensor:
    """The sampling-only filters in transformers' order (temperature, top-k, top-p, min-p). Each is skipped
    where transformers skips it: temperature None or 1, top_k None or 0, top_p None or >= 1, min_p None."""
    if temperature_value is not None and temperature_value != 1.0:
        scores = temperature(scores, temperature_value)
    if top_k_value:
        scores = top_k(scores, top_k_value)
    if top_p_value is not None and top_p_value < 1.0:
        scores = top_p(scores, top_p_value)
    if min_p_value is not None:
        scores = min_p(scores, min_p_value)
    return scores


def next_tokens(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64: argmax of the processed scores, or one draw per row from their softmax."""
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
