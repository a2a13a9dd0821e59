"""Variable-length (padding-free) attention for packed rows on CUDA: each document of a packed batch is its own
sequence for flash attention's varlen kernel, so no (T x T) block-diagonal mask is built and no attention work is
spent across documents. Elsewhere (CPU, softcapping, a torch without torch.nn.attention.varlen) the dense
block-diagonal mask of `build_masks` is used; both give the same result.

A document is a maximal run of equal `segment_ids` within a row (data/packing.py writes contiguous runs); the
padding at a row's end is a run of its own whose outputs are never used.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fasttune.kernels.dispatch import kernel_choice

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: the dense-mask path
    varlen_attn = None

FLASH_MAX_HEAD_DIM = 256  # the widest heads flash attention's kernels take

_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


@dataclass
class PackedSpans:
    """The documents of packed rows as flash attention's varlen kernel takes them: cu_seqlens, int32 (documents + 1,)
    start offsets into the flattened B*T tokens ending with B*T, and max_len, the longest document's length. Built by
    packed_spans."""

    cu_seqlens: torch.Tensor  # int32 (documents + 1,) offsets into the flattened (B*T) tokens
    max_len: int


def varlen_usable(x: torch.Tensor, softcap: float | None, windows: set, head_dim: int = 0) -> bool:
    """Whether varlen_attention can run for hidden states x here: torch has varlen_attn, x is fp16/bf16 on CUDA, no
    attention logit soft-cap, heads of at most 256 channels (flash attention's limit; Gemma 4's full layers have 512),
    FASTTUNE_KERNELS is not "torch", and sliding windows only where this torch's varlen_attn takes window_size."""
    if varlen_attn is None or not x.is_cuda or softcap or x.dtype not in (torch.float16, torch.bfloat16) or \
            head_dim > FLASH_MAX_HEAD_DIM:
        return False
    if kernel_choice() == "torch":
        return False
    return not (windows - {None}) or "window_size" in _PARAMS


def packed_spans(segment_ids: torch.Tensor) -> PackedSpans:
    """Document boundaries of packed rows (B, T). One small host copy: flash attention needs the maximum length."""
    seg = segment_ids.detach().cpu()
    b, t = seg.shape
    flat = seg.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::t] = True  # a row never continues the previous row's document
    cu = torch.cat([starts.nonzero().squeeze(1), torch.tensor([b * t])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSpans(cu.to(segment_ids.device, non_blocking=True), max_len)


def varlen_attention(q, k, v, spans: PackedSpans, window: int | None, scale: float) -> torch.Tensor:
    """q (B, T, Hq, D), k/v (B, T, Hkv, D) -> (B, T, Hq, D), causal within each document."""
    b, t = q.shape[:2]
    kw = dict(scale=scale)
    if q.shape[2] != k.shape[2]:
        if "enable_gqa" in _PARAMS:
            kw["enable_gqa"] = True
        else:  # torch < 2.13's varlen kernel wants as many k/v heads as q heads
            groups = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    if "window_size" in _PARAMS:
        kw["window_size"] = (-1, 0) if window is None else (window - 1, 0)  # key j allowed when i - j < window
    else:
        kw["is_causal"] = True
    out = varlen_attn(q.reshape(b * t, *q.shape[2:]), k.reshape(b * t, *k.shape[2:]),
                      v.reshape(b * t, *v.shape[2:]), spans.cu_seqlens, spans.cu_seqlens, spans.max_len,
                      spans.max_len, **kw)
    return out.view(b, t, *out.shape[1:])
