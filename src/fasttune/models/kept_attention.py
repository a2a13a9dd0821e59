"""Attention outputs kept from the forward pass, so that per-layer recompute does not run the attention kernel again.

With use_gradient_checkpointing="offload", backward re-runs each decoder layer from its input. The layer's causal
attention is then computed twice: once in the forward pass and once in the recompute, only to rebuild the graph
that its backward kernel needs. The backward kernel needs the forward's output and log-sum-exp, nothing the
recompute adds. At 32K tokens on an 8B model that second attention forward is about a tenth of the step.

Here the forward pass keeps the fused SDPA kernel's results (output and log-sum-exp; the output goes to pinned host
memory like the layer inputs). In the recompute the same `F.scaled_dot_product_attention` call runs again, but a
TorchDispatchMode answers the fused kernel's call with the kept results. Autograd still records torch's own SDPA
node, so the backward kernel, and every gradient, is exactly what the plain recompute gives. The forward pass asks
the kernel for the log-sum-exp (under no_grad SDPA does not), so its output is the recompute's output.

Only SDPA's fused kernels are answered (cuDNN, flash, memory-efficient, and flash on CPU). A call that reaches
another path (masks, the math fallback) simply recomputes.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _fused_sdpa_ops() -> dict:
    """{op: index of its compute_log_sumexp argument, or None when it always returns one} for the fused SDPA
    kernels this torch build has."""
    names = {"_scaled_dot_product_cudnn_attention": 4, "_scaled_dot_product_efficient_attention": 4,
             "_scaled_dot_product_flash_attention": None, "_scaled_dot_product_flash_attention_for_cpu": None}
    return {getattr(torch.ops.aten, n).default: i for n, i in names.items() if hasattr(torch.ops.aten, n)}


_OPS = _fused_sdpa_ops()


class _Capture(TorchDispatchMode):
    """Runs ops as usual and keeps the first fused SDPA call's op and results, with the log-sum-exp asked for."""

    def __init__(self):
        super().__init__()
        self.op, self.result = None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OPS and self.op is None:
            lse_arg = _OPS[func]
            if lse_arg is not None and len(args) > lse_arg:
                args = (*args[:lse_arg], True, *args[lse_arg + 1:])
            self.op, self.result = func, func(*args, **kwargs)
            return self.result
        return func(*args, **kwargs)


class _Replay(TorchDispatchMode):
    """Answers one call of `op` with `result`; every other op runs."""

    def __init__(self, op, result: tuple):
        super().__init__()
        self.op, self.result, self.used = op, result, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op and not self.used:
            self.used = True
            return self.result
        return func(*args, **(kwargs or {}))


def _dense_order(t: torch.Tensor) -> list[int]:
    """Dimensions from the largest stride to the smallest: t.permute(order) is contiguous for a dense tensor (fused
    kernels may write (B, H, T, D) outputs in (B, T, H, D) memory order, and their backward wants it back so)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


class AttentionKeeper:
    """The kept attention results of one forward pass, one entry per decoder layer (keyed by the layer's slot in
    the layer-input store). `store` keeps the outputs (a LayerInputOffloader: pinned host memory on CUDA, on the
    device otherwise); the log-sum-exp and the kernel's small extras stay on the device.

    `replays` counts recomputes answered from kept results (tests read it)."""

    def __init__(self, store):
        self.store = store
        self.records: dict[int, tuple] = {}
        self.replays = 0

    def run(self, layer_slot: int, recomputing: bool, attend):
        """attend() -> the SDPA output (B, H, T, D). First pass (recomputing False): run it, keeping the fused
        kernel's results under `layer_slot`. Recompute: run it again with those results answering the kernel's
        call, so only the graph is rebuilt; without kept results it simply runs."""
        if not recomputing:
            capture = _Capture()
            with capture:
                out = attend()
            if capture.op is not None and isinstance(capture.result, tuple):
                result = list(capture.result)
                order = _dense_order(result[0])
                index = self.store.save(result[0].permute(order))
                result[0] = None
                self.records[layer_slot] = (capture.op, index, result, order)
            return out
        record = self.records.pop(layer_slot, None)
        if record is None:
            return attend()
        op, index, result, order = record
        inverse = sorted(range(len(order)), key=order.__getitem__)
        result[0] = self.store.load(index).permute(inverse)
        replay = _Replay(op, tuple(result))
        with replay:
            out = attend()
        self.replays += replay.used
        return out
