"""Lean saves: inputs a fused LoRA product's backward rebuilds from values saved anyway, instead of keeping them.

In a decoder layer (one that keeps its activations, or a recomputed one's re-run), the q/k/v and gate/up products
keep their input (the norm's output, hidden values a token) and down_proj keeps its input (act(gate) * up,
intermediate values a token) for the LoRA A gradient. The norm already keeps its input and 1/rms, and the activation
its gate and up, for their own backward: from those, the same kernels give the same values again in one elementwise
pass. With lean saves on, the norm and activation mark their outputs with how to rebuild them, and kernels/lora.py
keeps the sources (tensors already saved by those nodes, so no memory) in place of the output. On the 8B shape that
is 2h + I of a layer's ~6h + 2kv + 3I values a token (~32%), for a pass over them in backward (about 1% of a step's
time, estimated; train/memory_policy.py turns it on only when memory is the limit).

The rebuilt values are bitwise the forward pass's (the same kernel on the same inputs, with the norm's saved 1/rms),
so gradients are unchanged.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_STATE = threading.local()
_ATTR = "_fasttune_rebuild"


@contextlib.contextmanager
def lean_saves(on: bool = True):
    """Within the block (when `on`), outputs of marking kernels made with autograd on carry their rebuild."""
    before = getattr(_STATE, "on", False)
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = before


def active() -> bool:
    """Whether an output made now should carry its rebuild: lean saves on and autograd recording."""
    return getattr(_STATE, "on", False) and torch.is_grad_enabled()


def mark(t: torch.Tensor, fn, *sources: torch.Tensor) -> torch.Tensor:
    """t, marked (when `active()` and t has a backward, which then keeps `sources`) as fn(*sources) under no_grad:
    the rebuild must give t's values bitwise, and `sources` must be what t's own backward keeps (else keeping them
    costs more than t). Returns t."""
    if active() and t.requires_grad:
        setattr(t, _ATTR, (fn, sources))
    return t


def rebuild_of(t: torch.Tensor):
    """(fn, sources) marked on t by `mark`, or None."""
    return getattr(t, _ATTR, None)


def rebuilt(fn, sources) -> torch.Tensor:
    """The marked tensor's values again: fn(*sources) without autograd."""
    with torch.no_grad():
        return fn(*sources)
