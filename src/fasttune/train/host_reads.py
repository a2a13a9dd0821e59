"""Reading metric values from the device: once per optimizer step, never per micro-batch (every read of a GPU
tensor waits for the kernels queued before it)."""
from __future__ import annotations

import torch


def host_values(values: list) -> list[float]:
    """`values` (numbers and tensors of one element) as Python floats, each exactly float(value); the tensors of
    each device are copied to the host together. Every read of a GPU tensor waits for all the kernels queued before
    it, so the trainer reads through here at most once per optimizer step, never once per micro-batch."""
    by_device: dict = {}
    for v in values:
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(v.detach().reshape(()).to(torch.float64))
    read = {dev: iter(torch.stack(ts).tolist()) for dev, ts in by_device.items()}
    return [next(read[v.device]) if isinstance(v, torch.Tensor) else float(v) for v in values]


def add_exact(total, value):
    """total + value in float64, bit for bit what adding them as Python floats gives, without reading a tensor:
    a tensor value keeps the running total on its device (for the metric sums objectives keep per micro-batch)."""
    if isinstance(value, torch.Tensor):
        return total + value.detach().to(torch.float64)
    return total + float(value)
