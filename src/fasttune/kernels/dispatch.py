"""Which implementation runs: FASTTUNE_KERNELS=torch|triton (default: triton on CUDA when installed, else torch).

On a CPU, Triton kernels run only under TRITON_INTERPRET=1 (tests do that); their bf16 arithmetic is wrong
there, so kernels compute in fp32 internally and bf16 is tested on the GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # CPU installs without triton use the torch references
    HAVE_TRITON = False


def kernel_choice() -> str:
    """FASTTUNE_KERNELS, lower-cased: "torch" (the references everywhere), "triton" (ours, also on a CPU where they
    can run) or "" (the default: ours on CUDA)."""
    return os.environ.get("FASTTUNE_KERNELS", "").lower()


def use_triton(x: torch.Tensor) -> bool:
    """Whether a kernel on `x` runs our Triton version: never without triton or under FASTTUNE_KERNELS=torch;
    under "triton" for CUDA tensors or with TRITON_INTERPRET=1; by default for CUDA tensors."""
    choice = kernel_choice()
    if choice == "torch" or not HAVE_TRITON:
        return False
    if choice == "triton":
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return x.is_cuda


_REPLAYED = [0]  # depth of replayed_launches() blocks


@contextlib.contextmanager
def replayed_launches():
    """Marks a step that a CUDA graph captures or warms up for (train/cuda_graphs.py): its kernel launches cost the
    host once, at capture, so paths of more, fused launches are taken even where eager steps would be host-bound."""
    _REPLAYED[0] += 1
    try:
        yield
    finally:
        _REPLAYED[0] -= 1


def launches_replayed() -> bool:
    """True inside replayed_launches(). (Not merely while a stream captures: a graph captured elsewhere was warmed
    up eagerly, and its capture must take the paths, and the compiled kernels, of that warm-up.)"""
    return _REPLAYED[0] > 0


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << (max(n, 1) - 1).bit_length()


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one copy stream of `device`, shared by every offload store and streamed weight. The caching allocator
    keeps freed blocks per stream: a new stream per forward pass (torch hands out 32 in turn) left each step's
    copy buffers cached for streams that came back only 32 steps later, and the reserved memory grew to several
    times the allocated (38-60 GiB reserved for 12 GiB allocated at 32K tokens). For the same reason the copies
    on it write into memory allocated from the main stream (the callers allocate first): it caches no blocks."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _SIDE_STREAMS[index]
