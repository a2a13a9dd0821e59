"""Causal sliding-window attention without a (T x T) mask.

A sliding-window layer (Gemma 3 / 4, Mistral, EXAONE 4, LFM3, ...) lets query i see key j when 0 <= i - j < window
(transformers' sliding_window_causal mask). Written as a dense boolean mask, SDPA can take neither its causal kernels
nor skip the blocks outside the band: every layer pays T x T scores (and a T x T mask in memory: 1 GiB at 32K
tokens). For a batch with no padding, packing, image blocks or cache, `build_masks` hands such a layer a
`SlidingWindow` instead, which `attention` runs here:

- CUDA, fp16/bf16, heads of at most 256 channels, a torch whose varlen_attn takes window_size: flash attention's
  own sliding-window kernel, each row one sequence (only the band is computed);
- elsewhere (CPU, fp32, Gemma 4's wider heads, FASTTUNE_KERNELS=torch): the band in blocks of `window` queries, each
  over its own block and the one before (2 x window keys) with one (window, 2 x window) mask, so T x 2 x window
  scores instead of T x T.

Both equal SDPA with the dense mask (`sliding_window_reference`) at the real positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttune.models.varlen import PackedSpans, varlen_attention, varlen_usable


@dataclass(frozen=True)
class SlidingWindow:
    """build_masks' mask for a sliding-window layer when nothing but the window restricts attention (no padding,
    packing, image blocks or cache): query i sees key j when 0 <= i - j < size. `dense` gives the same mask as a
    bool tensor, for the paths that need one."""

    size: int

    def dense(self, t: int, device, s: int | None = None) -> torch.Tensor:
        """The mask as bool (1, 1, t, s) (s default t) for t queries at the last t of s positions (a prefill's
        last-position layers keep only the last query)."""
        s = t if s is None else s
        q = torch.arange(s - t, s, device=device)[:, None]
        kv = torch.arange(s, device=device)[None, :]
        return ((kv <= q) & (q - kv < self.size))[None, None]


def sliding_window_attention(q, k, v, window: int, scale: float) -> torch.Tensor:
    """Causal attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D) (Hq a multiple of Hkv) where query i sees keys
    i - window + 1 .. i. Returns (B, Hq, T, D). Raises nothing of its own (SDPA's errors pass through)."""
    t = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t <= window:  # the window never bites: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if varlen_usable(q, None, {window}, q.shape[-1]):
        return _flash_window(q, k, v, window, scale)
    return banded_attention(q, k, v, window, scale)


def _flash_window(q, k, v, window: int, scale: float) -> torch.Tensor:
    """Flash attention's sliding-window kernel, each of the B rows one sequence of T tokens."""
    b, _, t, _ = q.shape
    spans = PackedSpans(torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device), t)
    out = varlen_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spans, window, scale)
    return out.transpose(1, 2)


def banded_attention(q, k, v, window: int, scale: float, lead: tuple | None = None,
                     sdpa=F.scaled_dot_product_attention) -> torch.Tensor:
    """sliding_window_attention through SDPA on blocks: queries in blocks of `window`, the first block plainly causal,
    every later block over its own keys and the previous block's (2 x window) with one shared (window, 2 x window)
    mask. The sequence is zero-padded to whole blocks; padded keys come after every real query, so the causal part of
    the mask hides them, and padded queries are cut off. q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D).
    lead: (key, value), each (B, Hkv, 1, D), one more key every query sees, put first (gpt-oss's sink key, see
    attention.attention_with_sinks). sdpa: what attends within each block, F.scaled_dot_product_attention or a
    function of its signature (Gemma 2's soft-capped scores, attention.softcapped_sdpa)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    w = window
    if hq != hkv and q.is_cuda:
        # SDPA's memory-efficient CUDA kernel takes a mask but not grouped heads (with both it would fall back to
        # the math path): repeat the key/value heads
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        if lead is not None:
            lead = tuple(x.repeat_interleave(hq // hkv, dim=1) for x in lead)
        hkv = hq
    gqa = hq != hkv
    r = torch.arange(w, device=q.device)[:, None]
    if lead is None:
        first = sdpa(q[:, :, :w], k[:, :, :w], v[:, :, :w], is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        causal = torch.cat([r.new_ones(w, 1, dtype=torch.bool), torch.arange(w, device=q.device)[None, :] <= r], 1)
        first = sdpa(q[:, :, :w], torch.cat([lead[0], k[:, :, :w]], dim=2), torch.cat([lead[1], v[:, :, :w]], dim=2),
                     attn_mask=causal, scale=scale, enable_gqa=gqa)
    n = -(-t // w)  # blocks, the first included
    pad = n * w - t

    def blocks(x, start=0):
        """(B, H, n x w, D) -> (B * (n - 1), H, w, D): its blocks start .. start + n - 2; a lead key (B, H, 1, D)
        -> (B * (n - 1), H, 1, D), the same key for every block."""
        shared = x.shape[2] == 1  # the lead key (t > w, so a sequence has more positions)
        size = 1 if shared else w
        x = x.expand(-1, -1, n - 1, -1) if shared else x[:, :, start * w:(start + n - 1) * w]
        return x.reshape(x.shape[0], x.shape[1], n - 1, size, x.shape[-1]).transpose(1, 2) \
            .reshape(-1, x.shape[1], size, x.shape[-1])

    q, k, v = (F.pad(x, (0, 0, 0, pad)) if pad else x for x in (q, k, v))  # whole blocks, padded once
    keys = [blocks(k, 0), blocks(k, 1)]  # each later block's previous block, then itself
    values = [blocks(v, 0), blocks(v, 1)]
    j = torch.arange(2 * w, device=q.device)[None, :]
    band = (j > r) & (j <= r + w)  # key w + r is the query itself; keys more than w - 1 back are out
    if lead is not None:
        keys.insert(0, blocks(lead[0]))
        values.insert(0, blocks(lead[1]))
        band = torch.cat([band.new_ones(w, 1), band], dim=1)
    rest = sdpa(blocks(q, 1), torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=band, scale=scale,
                enable_gqa=gqa)
    rest = rest.reshape(b, n - 1, hq, w, d).transpose(1, 2).reshape(b, hq, (n - 1) * w, d)
    return torch.cat([first, rest[:, :, :t - w]], dim=2)


def sliding_window_reference(q, k, v, window: int, scale: float) -> torch.Tensor:
    """The same attention through SDPA with the dense (T x T) mask: what sliding_window_attention must equal."""
    mask = SlidingWindow(window).dense(q.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
