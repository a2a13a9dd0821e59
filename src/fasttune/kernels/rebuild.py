"""Lean saves: inputs a fused LoRA product's backward rebuilds from values saved anyway, instead of keeping them.

In a decoder layer that keeps its activations (no recompute, or after recompute_layers), the q/k/v and gate/up
products keep their input (the norm's output, hidden values a token) and down_proj keeps its input (act(gate) * up,
intermediate values a token) for the LoRA A gradient. The norm already keeps its input and 1/rms, and the activation
its gate and up, for their own backward: from those, the same kernels give the same values again in one elementwise
pass. With lean saves on, the norm and activation mark their outputs with how to rebuild them, and kernels/lora.py
keeps the sources (tensors already saved by those nodes, so no memory) in place of the output. On the 8B shape that
is 2h + I of a layer's ~6h + 2kv + 3I values a token (~32%), for a pass over them in backward (~1.5% of a step's
time, estimated; train/memory_policy.py turns it on only when memory is the limit).

An MoE block's experts (models/moe.py) chain marks: the sorted copy of the normed input is rebuilt from the norm's
sources by the same gather (`mark_through`), and torch's grouped rank-r product, which would keep its input, runs
through `call_rebuilding` (it keeps the sources and recomputes the cheap product in backward).

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


def mark_through(t: torch.Tensor, fn, x: torch.Tensor) -> torch.Tensor:
    """t = fn(x) (an exact, deterministic function such as a row gather), marked as rebuilt from x's own mark when x
    carries one: t then costs nothing to keep, where keeping x itself instead would cost x. Returns t."""
    again = rebuild_of(x) if active() else None
    if again is not None and t.requires_grad:
        inner, sources = again
        setattr(t, _ATTR, (lambda *s: fn(inner(*s)), sources))
    return t


class _FromRebuilt(torch.autograd.Function):
    """fn(x, *params), keeping x's rebuild sources instead of x; backward rebuilds x, runs fn again with autograd and
    back-propagates (for cheap fn: the rank-r product of a LoRA)."""

    @staticmethod
    def forward(ctx, x, fn, again, *params):
        """x: the marked tensor; fn(x, *params) -> one tensor; again: x's (rebuild, sources); params: tensors."""
        ctx.fn, ctx.rebuild, ctx.n = fn, again[0], len(again[1])
        ctx.save_for_backward(*again[1], *params)
        return fn(x, *params)

    @staticmethod
    def backward(ctx, grad):
        """grad like the output -> (d x, None, None, d params...), None where not needed."""
        saved = ctx.saved_tensors
        x = rebuilt(ctx.rebuild, saved[:ctx.n]).detach().requires_grad_(ctx.needs_input_grad[0])
        params = [p.detach().requires_grad_(need) for p, need in zip(saved[ctx.n:], ctx.needs_input_grad[3:])]
        with torch.enable_grad():
            out = ctx.fn(x, *params)
        wanted = [t for t in (x, *params) if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (next(got) if x.requires_grad else None, None, None,
                *(next(got) if p.requires_grad else None for p in params))


def call_rebuilding(fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """fn(x, *params); when autograd records and x is marked, x's rebuild sources are kept instead of x (backward
    rebuilds x and runs fn again: use for cheap fn only)."""
    again = rebuild_of(x) if torch.is_grad_enabled() else None
    if again is None:
        return fn(x, *params)
    return _FromRebuilt.apply(x, fn, again, *params)
