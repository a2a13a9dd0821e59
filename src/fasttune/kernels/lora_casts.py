"""16-bit copies of the LoRA factors that a decode step reads, refreshed by one multi-tensor copy per step.

The fused LoRA path (kernels/lora.py) casts each layer's fp32 lora_A / lora_B to the activations' dtype and
concatenates a group's A factors on every call. In training that is noise beside the GEMMs; in a decode step of a few
rows it is not: on the Llama-3.1-8B shape at 64 rows (GRPO's sampling) those ~13 small kernels per layer (a cast
per factor, a concatenation per group) were ~0.3 s of the 0.8 s that LoRA added to 256 decode steps. Here the
step's 16-bit copies live in buffers kept with the decode step (a group's A factors as row blocks of one buffer, so
nothing is concatenated), and each step starts with `refresh`: one `torch._foreach_copy_` from every fp32 factor into
its copy, a few launches for the whole model. The copies are re-read from the live parameters at every step (inside
the CUDA graph too), so training between two generate() calls, or an in-place change of a factor, is seen by the next
step. The values are the ones the per-call casts give (the same rounding to the same dtype).

Used only while `active(casts)` is entered (models/static_decode.py around a decode step) and gradients are off.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

_ACTIVE: list["LoraCasts"] = []


class LoraCasts:
    """The 16-bit factor copies of one decode step: {(layer ids, dtype): (A buffer (sum of ranks, in), [B copy
    (out_i, r_i)], the layers)}, and the (fp32 source, copy) pairs that `refresh` copies. The layers are held so that
    their ids stay theirs while the entry lives."""

    def __init__(self):
        self.groups: dict[tuple, tuple] = {}
        self.sources: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []

    def refresh(self) -> None:
        """Copy every registered fp32 factor into its 16-bit copy (values rounded as `.to(dtype)` rounds them)."""
        if self.sources:
            torch._foreach_copy_(self.copies, self.sources)

    def factors(self, layers, params, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(A of all `layers` stacked (sum of ranks, in) and each layer's B (out_i, r_i)) in `dtype`; params are
        (lora_A, lora_B) per layer. A group seen for the first time gets its buffers, filled now and registered for
        `refresh`."""
        key = (tuple(id(layer) for layer in layers), dtype)
        hit = self.groups.get(key)
        if hit is not None:
            return hit[0], hit[1]
        a_src, b_src = params[0::2], params[1::2]
        a_all = torch.empty(sum(a.shape[0] for a in a_src), a_src[0].shape[1], dtype=dtype, device=a_src[0].device)
        a_parts = list(a_all.split([a.shape[0] for a in a_src]))
        bs = [torch.empty(b.shape, dtype=dtype, device=b.device) for b in b_src]
        for src, dst in zip([*a_src, *b_src], [*a_parts, *bs]):
            dst.copy_(src.detach())
            self.sources.append(src.detach())
            self.copies.append(dst)
        self.groups[key] = (a_all, bs, tuple(layers))
        return a_all, bs


@contextmanager
def active(casts: LoraCasts):
    """Within: fused LoRA groups called without gradients read their factors from `casts`."""
    _ACTIVE.append(casts)
    try:
        yield casts
    finally:
        _ACTIVE.pop()


def current() -> LoraCasts | None:
    """The LoraCasts a gradient-free LoRA group should read from, or None (the factors are cast per call)."""
    return _ACTIVE[-1] if _ACTIVE and not torch.is_grad_enabled() else None
