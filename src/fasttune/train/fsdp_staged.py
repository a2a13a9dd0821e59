"""Moving a model loaded with from_pretrained(fsdp=True) onto the GPUs while FSDP shards it (train/fsdp.py's
shard_model).

Rank 0 holds the loaded model in host memory (quantised on its GPU as it was read); the other ranks hold the same
modules on the meta device, built from the checkpoint's headers (models/loading.py), so one copy of the weights
waits in host memory whatever the number of GPUs. A part of the model is placed on the GPU (rank 0 copies it
there, the others allocate it empty) and rank 0 broadcasts its tensors into the others' (as raw bytes: NF4's and
int8's integer storage and FP8 weights travel unchanged), with the NF4 layers' double-quantisation offsets (a
Python float each). The decoder layers go one at a time, each sharded before the next is placed.
"""
from __future__ import annotations

from itertools import chain

import torch
import torch.distributed as dist
from torch import nn

from fasttune.train.distributed import broadcast_from_rank0


def _tensors(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    return list(chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse)))


def any_rank_on_meta(model: nn.Module, device: torch.device) -> bool:
    """Whether any rank's `model` holds tensors on the meta device (then every placement is followed by rank 0's
    broadcast). A collective: every rank calls it. Raises RuntimeError if rank 0's does (it must hold the weights)."""
    mine = any(t.is_meta for t in _tensors(model))
    if dist.get_rank() == 0 and mine:
        raise RuntimeError("rank 0's model has tensors on the meta device; it must hold the loaded weights "
                           "(from_pretrained(fsdp=True) loads them there)")
    flag = torch.tensor([1.0 if mine else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def place(module: nn.Module, device: torch.device, fill: bool) -> None:
    """Put `module` (with its submodules) on `device`: moved there, or allocated empty where its tensors are on the
    meta device; then rank 0's tensors and NF4 offsets broadcast into every rank's with `fill`, else rank 0's
    trainable parameters only (every rank read the weights; the LoRA draws may differ: Dist.same_start). A
    collective."""
    if any(t.is_meta for t in _tensors(module)):
        module.to_empty(device=device)
    else:
        module.to(device)
    if fill:
        _broadcast(module, _tensors(module))
    else:
        broadcast_from_rank0([p for p in module.parameters() if p.requires_grad])


def place_outside(model: nn.Module, layers: list, device: torch.device, fill: bool) -> None:
    """place() every part of CausalLM `model` outside `layers` (the embeddings, final norm, LM head; the own tensors
    of the modules that contain the layers), then tie the LM head to the embeddings again where the config ties
    them (a move off the meta device makes new Parameters)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    whole, holders = [], []

    def visit(module: nn.Module) -> None:
        """Sort `module`'s children into `whole` (no layer inside) and containers of layers (visited in turn);
        `module` itself joins `holders`."""
        holders.append(module)
        for child in module.children():
            if id(child) in inside:
                continue
            if any(id(m) in inside for m in child.modules()):
                visit(child)  # a container of layers (the decoder): its other parts one by one
            else:
                whole.append(child)
    visit(model)
    for module in whole:
        place(module, device, fill=False)
    for module in holders:
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                moved = torch.empty_like(t, device=device) if t.is_meta else t.detach().to(device)
                store[name] = nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                    else moved
    model.tie_weights()
    if fill:
        for module in whole:
            _broadcast(module, _tensors(module))
        for module in holders:
            _broadcast(module, _tensors(module, recurse=False))


def _broadcast(module: nn.Module, tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of `tensors` (the same list on every rank) and of `module`'s NF4 offsets into every rank's."""
    sending = dist.get_rank() == 0
    with torch.no_grad():
        for t in tensors:
            if not (sending or t.is_contiguous()):  # (to_empty makes contiguous ones: a view would not receive)
                raise RuntimeError("a receiving tensor is not contiguous")
            held = t.detach().contiguous() if sending else t.detach()
            dist.broadcast(held.reshape(-1).view(torch.uint8), src=0)
    nf4 = [m for m in module.modules() if getattr(m, "quant_type", None) == "nf4"]
    if nf4:
        offsets = [[m.offset for m in nf4]]
        dist.broadcast_object_list(offsets, src=0)
        for m, offset in zip(nf4, offsets[0]):
            m.offset = offset
