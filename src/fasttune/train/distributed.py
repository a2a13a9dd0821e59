"""torch.distributed for the trainer: launched by `torchrun`, one process per device (gloo on CPU, NCCL on GPUs).

Each optimizer step takes `per_device x gradient_accumulation_steps x world_size` examples; rank r works on its
own slice of the step's micro-batches. The target-token count that normalises the loss is summed over all ranks
and gradients are all-reduced (summed) before clipping, so N processes compute exactly the update one process
computes with N times the accumulation. Only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import os
import sys

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)  # a dead rank ends the job with an error instead of hanging forever
EXIT_BARRIER_TIMEOUT = datetime.timedelta(seconds=60)
_failed = []  # set when this process dies of an uncaught exception: its peers will not reach the exit barrier


def note_failure():
    """Mark this process as ending in failure, so its exit skips the barrier that would wait for peers still
    inside training. Uncaught exceptions are marked automatically; the CLI calls this for the errors it prints."""
    _failed.append(True)


def _note_failure(hook):
    """sys.excepthook `hook` wrapped to mark this process as failed (note_failure) first."""
    def excepthook(*exc):
        """An uncaught exception: marked as a failure, then handled by the previous hook."""
        note_failure()
        hook(*exc)
    return excepthook


def _destroy_process_group():
    """Tear the group down while the interpreter is fully alive. On a normal exit all ranks first meet in a
    barrier, so no collective is still in flight on one rank while a peer closes its connections, and Python
    objects that hold finished collectives are collected before the group goes."""
    if not dist.is_initialized():
        return
    if not _failed:
        try:
            dist.barrier(async_op=True).wait(EXIT_BARRIER_TIMEOUT)
        except Exception:  # noqa: BLE001 - a peer that died or left: nothing left to wait for
            pass
    gc.collect()
    dist.destroy_process_group()


def _packed(tensors, collective) -> None:
    """Run `collective` (in place on one flat tensor) over `tensors` packed per dtype, and copy the results back into
    them: one collective per dtype instead of one per LoRA matrix."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            collective(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_from_rank0(tensors) -> None:
    """Rank 0's values of `tensors` (the same list, shapes and dtypes on every rank) copied into every rank's, in
    place, one packed broadcast per dtype. A collective."""
    _packed(tensors, lambda flat: dist.broadcast(flat, src=0))


def launched_by_torchrun() -> bool:
    """Whether this process is one of several (torchrun's WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device() -> torch.device | None:
    """The device of this process under torchrun (cuda:LOCAL_RANK), or None when not distributed."""
    if launched_by_torchrun() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def launch_rank() -> int:
    """This process's rank in a torchrun launch (torchrun's RANK), 0 when not distributed; readable before the
    process group starts (from_pretrained(fsdp=True) loads on rank 0 only)."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


_HOST_GROUPS: dict = {}


def _host_group():
    """The group that sums host values: the default group when it is gloo already, else one gloo group over all
    ranks, made once per process (creating a group is itself a collective every rank joins)."""
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _HOST_GROUPS:
        _HOST_GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _HOST_GROUPS["gloo"]


class Dist:
    """This process's place in a torchrun launch (active, world, rank, is_main) and the few collectives the trainer
    needs. On first use under torchrun it starts the process group (NCCL on CUDA, else gloo) and a gloo group for
    host values; without torchrun every method is the one-process identity."""

    def __init__(self):
        self.active = launched_by_torchrun() and dist.is_available()
        if self.active and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_device())
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
            # Tear the group down before interpreter exit: a group left to die with the process can abort it
            # ("terminate called without an active exception") after training has finished.
            atexit.register(_destroy_process_group)
            sys.excepthook = _note_failure(sys.excepthook)
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        self.is_main = self.rank == 0
        self._host_group = _host_group() if self.active else None

    def shard(self, group: list, per_rank: int) -> list:
        """This rank's per_rank consecutive items of `group` (all ranks' micro-batches of a step, rank-major)."""
        return group[self.rank * per_rank:(self.rank + 1) * per_rank]

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (a host float in, a host float out). It travels through a gloo group on
        the CPU: through NCCL it would queue behind the device's work and its read would wait for all of it
        (draining the queue the CPU keeps ahead of the GPU, several times a step)."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, group=self._host_group)
        return float(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable host values), in rank order, through the gloo host group; [obj] without
        torchrun. Every rank must call it."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self._host_group)
        return out

    def any(self, flag: bool) -> bool:
        """Whether `flag` is True on any rank (every rank must call it)."""
        return self.sum(1.0 if flag else 0.0) > 0

    def sum_grads(self, params):
        """The gradients of `params` summed over the ranks in place (one all-reduce per dtype; a missing gradient
        joins as zeros). Every rank must call it."""
        if not self.active:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a rank without data this step still joins the reduction
        _packed([p.grad for p in params], dist.all_reduce)

    def same_start(self, model):
        """Rank 0's values of `model`'s trainable parameters in every rank's, in place (no-op without torchrun), as
        torch's DistributedDataParallel broadcasts a module when it wraps it: the ranks then start from one
        adapter even when a script drew its LoRA weights after seeding each rank differently (accelerate's
        set_seed(..., device_specific=True)), where the replicas would otherwise train apart. Every rank must call
        it; the parameters are whole (not sharded yet) on this rank's device."""
        if self.active:
            broadcast_from_rank0([p for p in model.parameters() if p.requires_grad])

    def barrier(self):
        """Wait for every rank (no-op without torchrun)."""
        if self.active:
            dist.barrier()
