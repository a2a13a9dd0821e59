"""The tokenizer inside a processor, for code that encodes text.

transformers' processors (and fasttune's VisionProcessor, which behaves as they do) return a batch of one for a
single string, while a tokenizer returns its ids; code that wants a string's ids calls the tokenizer itself.
"""
from __future__ import annotations


def text_tokenizer(tokenizer_or_processor):
    """A processor's `tokenizer` (transformers' ProcessorMixin, fasttune's VisionProcessor); a tokenizer itself."""
    inner = getattr(tokenizer_or_processor, "tokenizer", None)
    return tokenizer_or_processor if inner is None or not callable(inner) else inner
