"""Queries on possibly FSDP-sharded models and tensors, for the modules below training that save or read them
(adapters, merged exports, checkpoints). Sharding itself is train/fsdp.py, which re-exports these names.

They import only torch, so peft/ and export/ can use them without importing the training package.
"""
from __future__ import annotations

import torch


def is_sharded(model) -> bool:
    """Whether `model` is sharded by FSDP2 (torch.distributed.fsdp's fully_shard makes it an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (collective: all ranks must call it in the same order); else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def writes_here(model) -> bool:
    """False on ranks other than 0 of a distributed run (FSDP or DDP, torch.distributed initialized): they join the
    gathers of a sharded model's save but write nothing, so ranks that all call save_pretrained do not race to write
    one folder. `model` is unused (kept for the callers' reading)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def gather_state(tensors: dict, keep: bool) -> dict:
    """{name: full CPU tensor} for a dict of (possibly sharded) tensors; every rank gathers, only `keep` keeps."""
    out = {}
    for k, v in tensors.items():
        t = full_tensor(v.detach())
        if keep:
            out[k] = t.contiguous().cpu()
    return out


def join_unused(x: torch.Tensor, modules) -> torch.Tensor:
    """x + 0 x (the sum of every trainable parameter of `modules`; None entries skipped), so that backward gives
    each of them a gradient (zeros where the pass did not use it). FSDP reduce-scatters the gradients of one sharded
    unit together, with each rank sending those its backward produced: a rank whose batch skipped a trainable module
    (a vision tower with no images in the batch, Llama 3.2 Vision's cross-attention layers without images) would send
    fewer than the others and the collective would hang. Callers apply it only to sharded models, with grad enabled.
    x: any floating tensor; returned in its dtype and shape."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    if not params:
        return x
    zero = torch.stack([p.sum().float() for p in params]).sum() * 0.0
    return x + zero.to(x.dtype)
