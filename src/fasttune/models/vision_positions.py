"""Positions of the vision-language models' tokens: Qwen's multimodal RoPE positions (transformers' get_rope_index
rule), and the per-document positions of packed rows (packing=True), each document numbered as it would be alone."""
from __future__ import annotations

from collections.abc import Callable

import torch

from fasttune.errors import ConfigError


def qwen_vl_positions(input_ids: torch.Tensor, image_grid_thw, attention_mask, image_token_id: int,
                      spatial_merge_size: int, video_token_id: int | None = None, video_grid_thw=None,
                      video_intervals: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL positions for multimodal RoPE, as transformers' `get_rope_index` computes
    them: text tokens count up on all three axes; an image's or video's (t, h, w) grid of merged patches gets
    positions start + (t * interval, row, column), and the text after it continues at start + max(h, w) / merge.

    input_ids (B, T) int; image_grid_thw (images, 3) and video_grid_thw (videos, 3) int, in order over the rows
    (Qwen3-VL's videos already split into one grid per frame, see VisionCausalLM.rope_index); video_intervals: per
    video the temporal step (Qwen2.5-VL: tokens_per_second x second_per_grid_ts; default 1, also for images);
    attention_mask (B, T) 1 = real token (padding gets position 0). Returns (positions (3, B, T) long, rope_deltas
    (B, 1): the position of the next token minus the row's length, which generation adds to text positions). Raises
    ConfigError when the image or video tokens of a row do not match the grids."""
    ids = input_ids.detach().cpu()
    b, t = ids.shape
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    grids = {kind: [] if g is None else [tuple(x) for x in g.detach().cpu().tolist()]
             for kind, g in (("image", image_grid_thw), ("video", video_grid_thw))}
    intervals = {"image": [1] * len(grids["image"]), "video": video_intervals or [1] * len(grids["video"])}
    used = {"image": 0, "video": 0}
    out = torch.zeros(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    for row in range(b):
        real = ids[row][mask[row]]
        kinds = {"image": real == image_token_id,
                 "video": real == video_token_id if video_token_id is not None else torch.zeros_like(real, dtype=bool)}
        visual = kinds["image"] | kinds["video"]
        pieces, pos, i, n = [], 0, 0, len(real)
        while i < n:
            j = i
            if not visual[i]:
                while j < n and not visual[j]:
                    j += 1
                pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
                i = j
                continue
            kind = "image" if kinds["image"][i] else "video"
            if used[kind] >= len(grids[kind]):
                raise ConfigError(f"Row {row} holds more {kind} placeholder tokens than {kind}_grid_thw describes.")
            gt, gh, gw = grids[kind][used[kind]]
            interval = intervals[kind][used[kind]]
            used[kind] += 1
            lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
            count = gt * lh * lw
            if int(kinds[kind][i:i + count].sum()) != count:
                raise ConfigError(f"Row {row}: {'an' if kind == 'image' else 'a'} {kind} of grid {(gt, gh, gw)} needs "
                                  f"{count} placeholder tokens in a row; the row was cut inside it or does not belong "
                                  f"to these grids.")
            tt, hh, ww = torch.meshgrid((torch.arange(gt) * interval).long(), torch.arange(lh), torch.arange(lw),
                                        indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(gh, gw) // spatial_merge_size
            i += count
        if pieces:
            positions = torch.cat(pieces, dim=1)
            out[:, row, mask[row]] = positions
            deltas[row, 0] = int(positions.max()) + 1 - n
    return out.to(input_ids.device), deltas.to(input_ids.device)


def packed_positions(rope_index: Callable, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """The multimodal positions of packed rows: each document (a run of one segment id > 0 in segment_ids (B, T))
    gets the positions it would get alone; padding (segment 0) gets 0. rope_index(ids (D, L), attention_mask (D, L))
    -> (3, D, L) positions numbers the documents laid out one a row, left-aligned (their images' and videos' grids
    taken in order, as the packed rows carry them). Returns (3, B, T) long."""
    b, t = input_ids.shape
    spans = [(row, (segment_ids[row] == s).nonzero().squeeze(1))
             for row in range(b) for s in torch.unique(segment_ids[row]).tolist() if s > 0]
    longest = max((len(i) for _, i in spans), default=1)
    docs = input_ids.new_zeros(len(spans), longest)
    mask = torch.zeros_like(docs)
    for d, (row, index) in enumerate(spans):
        docs[d, :len(index)], mask[d, :len(index)] = input_ids[row, index], 1
    positions = rope_index(docs, mask)
    out = positions.new_zeros(3, b, t)
    for d, (row, index) in enumerate(spans):
        out[:, row, index] = positions[:, d, :len(index)]
    return out
