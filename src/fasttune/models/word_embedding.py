"""Gemma's input embedding, scaled inside the module as transformers 5's Gemma*TextScaledWordEmbedding scales it.

Keeping the sqrt(hidden_size) factor inside `embed_tokens` (not in the decoder's forward) makes
`model.get_input_embeddings()(ids)` return what transformers' Gemma models return, so code that hooks or calls that
module sees the same values: NEFTune's forward hook (transformers' Trainer and TRL's trainers add its noise to the
module's output, after the scale), and callers that build `inputs_embeds` themselves.
"""
from __future__ import annotations

import torch
from torch import nn


def scale_rows(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """x (..., H) embedding rows times `scale` rounded to x's dtype first (transformers'
    `embed_scale.to(weight.dtype)`); x itself when scale is None."""
    return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)


class ScaledWordEmbedding(nn.Embedding):
    """nn.Embedding whose rows come out times `embed_scale` (a Python float: Gemma's sqrt(hidden_size)); the state
    dict is nn.Embedding's (`weight` only). forward(ids (...) int64) -> (..., H) in the weight's dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float, **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.embed_scale = float(embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int64 -> rows (..., H) times embed_scale (rounded to the weight's dtype first)."""
        return scale_rows(super().forward(ids), self.embed_scale)

    def extra_repr(self) -> str:
        """nn.Embedding's description plus the scale (what print(model) shows)."""
        return f"{super().extra_repr()}, embed_scale={self.embed_scale:g}"


def word_embedding(vocab_size: int, hidden_size: int, embed_scale: float | None) -> nn.Embedding:
    """The decoder's `embed_tokens`: a ScaledWordEmbedding when the family scales its embeddings (Gemma), else a
    plain nn.Embedding."""
    if embed_scale is None:
        return nn.Embedding(vocab_size, hidden_size)
    return ScaledWordEmbedding(vocab_size, hidden_size, embed_scale)
