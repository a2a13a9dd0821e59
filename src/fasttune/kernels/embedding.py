"""Embedding rows gathered by the GPU straight out of a table in pinned host memory (`offload_embedding`).

With unified virtual addressing, page-locked host memory allocated through CUDA (torch's `pin_memory()`) is
readable from kernels at its host address, so a frozen input embedding can stay in host memory and each forward
reads only the rows of its tokens over the bus: no host sync, no copy of the table, and the gather can be captured
in a CUDA graph. The reference (`embedding_rows_reference`) is torch's embedding lookup.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2


def embedding_rows_reference(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[ids] on the table's device, returned on ids' device: ids (...) int64, table (V, H) -> (..., H) in the
    table's dtype. Raises IndexError for ids outside [0, V) (torch's embedding)."""
    return F.embedding(ids.to(table.device), table).to(ids.device, non_blocking=True)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_rows(ids_ptr, table_ptr, out_ptr, vocab, hidden, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        token = tl.load(ids_ptr + row).to(tl.int64)
        valid = (token >= 0) & (token < vocab)
        inside = cols < hidden
        # An id outside the table reads row 0 (never memory past the table) and writes NaN.
        values = tl.load(table_ptr + tl.where(valid, token, 0) * hidden + cols, mask=inside)
        values = tl.where(valid, values, float("nan"))
        tl.store(out_ptr + row * hidden + cols, values.to(out_ptr.dtype.element_ty), mask=inside)


def embedding_rows(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows `table[ids]` written on ids' device by a Triton kernel that reads `table` where it lies (pinned host
    memory, or any memory the kernel can address).

    ids (...) integer tensor on the output device; table (V, H) contiguous. Returns (..., H) in the table's dtype.
    An id outside [0, V) gives a row of NaN (a kernel cannot raise; the trainer checks token ids against the
    vocabulary before training). Raises RuntimeError where Triton is missing or the table is not addressable from
    the device (see `device_reads_host`)."""
    if not HAVE_TRITON:
        raise RuntimeError("embedding_rows needs Triton")
    flat = ids.reshape(-1)
    hidden = table.shape[1]
    out = torch.empty(flat.numel(), hidden, dtype=table.dtype, device=ids.device)
    if flat.numel():
        block = min(1024, next_pow2(hidden))
        _gather_rows[(flat.numel(), triton.cdiv(hidden, block))](flat, table, out, table.shape[0], hidden,
                                                                  BLOCK=block)
    return out.view(*ids.shape, hidden)


_READS_HOST: dict[torch.device, bool] = {}


def device_reads_host(device: torch.device) -> bool:
    """Whether kernels on `device` read pinned host memory correctly (unified addressing): checked once per device
    by gathering rows of a small pinned table and comparing them with the reference."""
    device = torch.device(device)
    if device not in _READS_HOST:
        ok = False
        if HAVE_TRITON and device.type == "cuda":
            try:
                table = torch.arange(64 * 48, dtype=torch.float32).view(64, 48).pin_memory()
                ids = torch.tensor([[3, 0], [63, 17]], device=device)
                ok = torch.equal(embedding_rows(ids, table).cpu(), table[ids.cpu()])
            except Exception:  # noqa: BLE001 - no UVA / pointer not addressable: the caller copies rows instead
                ok = False
        _READS_HOST[device] = ok
    return _READS_HOST[device]
