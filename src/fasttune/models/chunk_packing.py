"""Packed runs for the chunked recurrent mixers (models/delta_rule.py's gated delta rule, models/ssd.py's Mamba-2
scan): every run of a row (a packed document, or a padding run) is moved to start a chunk, its row's runs one after
another, each padded to whole chunks with zeros, so one chunked pass computes them all and the scan zeroes the carried
state where a run's first chunk starts."""
from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.lru_cache(maxsize=4)  # every recurrent layer of a forward pass (and its recompute) packs alike
def packing_plan(spans: tuple, b: int, t: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """spans: (row, start, end) runs covering rows of length t. Returns (index (B, L) long: the flat source position
    b * t + i of each packed slot, -1 for padding; keep (B, L / chunk) fp32: 0 where a run starts, else 1)."""
    index, keep = [], []
    for row in range(b):
        positions, starts = [], set()
        for r, start, end in spans:
            if r == row:
                starts.add(len(positions) // chunk)
                positions += list(range(row * t + start, row * t + end)) + [-1] * (-(end - start) % chunk)
        index.append(positions)
        keep.append([0.0 if i in starts else 1.0 for i in range(len(positions) // chunk)])
    width = max(len(p) for p in index)
    return (torch.tensor([p + [-1] * (width - len(p)) for p in index], device=device),
            torch.tensor([kp + [1.0] * (width // chunk - len(kp)) for kp in keep], device=device))


def run_packed(run: Callable, inputs: tuple, spans, chunk: int) -> torch.Tensor:
    """run(*moved inputs, keep) -> out (B, L, ...) over the packed layout of packing_plan; inputs (B, T, ...) each.
    Returns out's positions put back in place, (B, T, ...); positions no span covers are zero."""
    b, t = inputs[0].shape[:2]
    index, keep = packing_plan(tuple(spans), b, t, chunk, inputs[0].device)
    width = index.shape[1]
    real = index >= 0
    gather = index.clamp(min=0).reshape(-1)

    def moved(x):
        """x (B, T, ...) -> (B, L, ...) in the packed layout, zeros at the padding."""
        flat = x.reshape(b * t, *x.shape[2:]).index_select(0, gather).reshape(b, width, *x.shape[2:])
        return flat * real.view(b, width, *([1] * (x.dim() - 2))).to(x.dtype)

    o = run(*(moved(x) for x in inputs), keep)
    out = torch.zeros(b * t, *o.shape[2:], dtype=o.dtype, device=o.device)
    out = out.index_copy(0, index[real], o[real])
    return out.reshape(b, t, *o.shape[2:])
