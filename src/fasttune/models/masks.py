"""Attention masks for the decoder: which keys each query may see, from an attention mask (padding), packed
document ids, sliding windows and image blocks; and the tests that let a batch skip the dense mask (right padding
runs as plain causal attention, left padding and packed documents as varlen sequences)."""
from __future__ import annotations

import torch

from fasttune.errors import ConfigError
from fasttune.models.window_attention import SlidingWindow


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of a (B, T) 0/1 mask is ones then zeros (no padding counts too)."""
    if attention_mask.shape[1] < 2:
        return bool(attention_mask.all())
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def padding_runs(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Segment ids (B, T) long that number the runs of padding and of real tokens in each row of a 0/1 mask (pads
    before, tokens, pads after: 0, 1, 2), when every row's real tokens form one run; None when a row has a hole."""
    m = attention_mask.bool()
    runs_of_ones = (m[:, 1:] & ~m[:, :-1]).sum(dim=1) + m[:, 0].long()
    if bool((runs_of_ones > 1).any()):
        return None
    change = torch.zeros_like(m, dtype=torch.long)
    change[:, 1:] = (m[:, 1:] != m[:, :-1]).long()
    return change.cumsum(dim=1)


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document ids (B, T) of rows whose positions restart at 0 after the first token (padding-free packing, as
    TRL's collator and transformers' flash-attention path write it), or None when no row restarts."""
    if position_ids.shape[1] < 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    return (position_ids == 0).long().cumsum(dim=1)


def segments_from_boundaries(cu_q: torch.Tensor, cu_k: torch.Tensor | None, batch: int, t: int) -> torch.Tensor:
    """Document ids (1, T) from cumulative document lengths (D + 1,) of one padding-free row. Raises ConfigError
    for more than one row, boundaries that do not cover the row, or different query and key boundaries."""
    if cu_k is not None and not torch.equal(cu_q, cu_k):
        raise ConfigError("cu_seq_lens_q and cu_seq_lens_k differ; fasttune's decoder trains causal self-attention, "
                          "where both are the document boundaries of the row.")
    if batch != 1 or int(cu_q[-1]) != t or int(cu_q[0]) != 0:
        raise ConfigError(f"cu_seq_lens_q {cu_q.tolist()} does not describe one padding-free row of {t} tokens "
                          f"(batch {batch}); padding-free batches are one row holding every document.")
    return torch.searchsorted(cu_q[1:].to(torch.long), torch.arange(t, device=cu_q.device), right=True)[None]


def build_masks(attention_mask, t: int, device, windows: set, past: int = 0, segment_ids=None,
                image_blocks=None, blocks_in_full_layers: bool = True, window_kernels: bool = False,
                blocks_beyond_window: bool = False) -> dict:
    """Boolean (B, 1, T, past + T) masks per sliding-window size (None = full causal) for T new positions after
    `past` cached ones; attention_mask covers all past + T. {None: None} means plain causal (see `attention`).
    `segment_ids` (B, T) of packed rows keep attention inside each document (block-diagonal). `image_blocks`
    (B, T; no cache): tokens of one block (an image; PaliGemma's prefix; equal ids >= 0) also see each other, later
    ones included; a window still applies to them (Gemma 3 / 4's create_masks_for_vision_model: AND(window,
    OR(causal, block))), or with blocks_beyond_window not (PaliGemma: transformers' create_sliding_window_causal_mask
    with an or_mask, OR(AND(causal, window), block)); blocks_in_full_layers=False keeps the
    full layers' mask causal (Gemma 4's create_masks_for_vision_model). window_kernels=True (past 0: training, or a
    prefill into an empty cache, whose keys are the T new ones):
    when only causality and the windows restrict attention, full layers get None and each window a SlidingWindow,
    which `attention` runs without a dense mask (models/window_attention.py)."""
    plain = attention_mask is None and segment_ids is None and image_blocks is None
    if plain and windows == {None} and (past == 0 or t == 1):
        return {None: None}
    if plain and window_kernels and past == 0:
        return {w: None if w is None else SlidingWindow(w) for w in windows}
    q = torch.arange(past, past + t, device=device)[:, None]
    kv = torch.arange(past + t, device=device)[None, :]
    plain = causal = kv <= q
    same = None
    if image_blocks is not None:
        same = (image_blocks[:, :, None] == image_blocks[:, None, :]) & (image_blocks[:, :, None] >= 0)
        causal = causal[None] | same  # (B, T, T)
    masks = {}
    for w in windows:
        if w is None:
            allowed = causal if blocks_in_full_layers else plain
        else:
            near = q - kv < w
            if same is None:
                allowed = plain & near
            else:
                allowed = (plain & near)[None] | same if blocks_beyond_window else causal & near
        allowed = allowed[:, None] if allowed.dim() == 3 else allowed[None, None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
            # A padding query that may see nothing would give NaN in softmax; let it see itself (its output is unused).
            allowed = allowed | (kv == q)
        masks[w] = allowed
    return masks
