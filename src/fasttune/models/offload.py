"""Per-layer recompute for use_gradient_checkpointing=True / "offload": each decoder layer keeps only its input;
with "offload" that input lives in pinned CPU memory between forward and backward.

Forward: the layer runs without building a graph; its input is copied to the host on a side CUDA stream while
the next layers compute. Backward (layers in reverse): the input of layer i is already on the GPU (it was
prefetched while layer i+1 ran its backward); layer i is recomputed from it and back-propagated, and the copy
of layer i-1's input starts. The copies overlap compute instead of stalling it. Every device tensor a copy reads or
writes is the main stream's memory, given back in stream order once the main stream has waited for the copy, and
the host never waits for a copy in a training step (Python runs layers ahead of the GPU; see save and fetch).

On a CPU the same path runs with plain host copies, so the recompute logic is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import threading
from functools import lru_cache

import torch

from fasttune.kernels.dispatch import side_stream

HOST_MARGIN_BYTES = 8 << 30  # left free for the process itself, the data and the OS


@lru_cache(maxsize=1)
def host_offload_budget() -> int:
    """Bytes of pinned host memory that offloaded layer inputs may use, measured once per process (later the
    caching host allocator holds the earlier steps' buffers, which then no longer count as available)."""
    available = _meminfo_available()
    for path, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, current = _read(path).strip(), int(_read(used))
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            available = min(available, int(limit) - current)
    return max(0, int(available * 0.9) - HOST_MARGIN_BYTES)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _meminfo_available() -> int:
    try:
        for line in _read("/proc/meminfo").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not limit


class _HostPool:
    """Page-locked host buffers, reused across steps. torch's pinned allocator rounds every block up to a power
    of two (a 3.4 GB layer input at 400K tokens takes 4 GiB), so buffers are plain host byte tensors registered
    with CUDA instead: exactly the bytes asked for, pinned once and reused while the sizes fit.

    A buffer comes back with the event of the last copy that reads it (`put`), and is handed out again only once that
    copy is done: backward never waits on the host for its copies (a wait there let the GPU catch up with Python)."""

    def __init__(self):
        self.idle: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self.registered: set[int] = set()

    def get(self, nbytes: int) -> torch.Tensor:
        """A pinned uint8 host buffer of at least `nbytes` (an idle one up to 25% larger, else a new one)."""
        # By position, not list.remove: that compares tensors with ==, elementwise (an error between sizes).
        fits = [i for i, (b, _) in enumerate(self.idle) if nbytes <= b.numel() <= nbytes * 5 // 4]
        if fits:
            buf, copied = self.idle.pop(min(fits, key=lambda i: self.idle[i][0].numel()))
            if copied is not None:
                copied.synchronize()  # (long done by the next forward pass: backward's copies ran a step ago)
            return buf
        self.release_idle()  # other sizes (another sequence length): give their pages back first
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
            self.registered.add(buf.data_ptr())
        else:  # registration refused (e.g. locked-memory limits): torch's own pinned memory
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def put(self, buf: torch.Tensor, copied: torch.cuda.Event | None = None):
        """Return `buf` (from get) to the pool; `copied`: the event after the last copy that reads or writes it
        (None: no copy is pending)."""
        self.idle.append((buf, copied))

    def release_idle(self):
        """Unpin and free every idle buffer (once its copies are done)."""
        for buf, copied in self.idle:
            if copied is not None:
                copied.synchronize()
            if buf.data_ptr() in self.registered:
                torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
                self.registered.discard(buf.data_ptr())
        self.idle = []  # dropping the references frees the memory


_POOL = _HostPool()
_STATE = threading.local()


def recomputing() -> bool:
    """True while a layer is being re-run inside backward: its output value is thrown away (only its graph is
    back-propagated), so a layer may skip work whose only use is that value (see DecoderLayer)."""
    return getattr(_STATE, "recomputing", False)


@contextlib.contextmanager
def _layer_scope(offloader, slot: int, recompute: bool):
    before = recomputing(), getattr(_STATE, "layer", None)
    _STATE.recomputing, _STATE.layer = recompute, (offloader, slot)
    try:
        yield
    finally:
        _STATE.recomputing, _STATE.layer = before


def kept_block():
    """(BlockKeeper, slot, replay) for the offloaded layer now running when its forward pass keeps (replay False) or
    kept (replay True) its attention block's values (models/kept_block.py), else None."""
    offloader, slot = getattr(_STATE, "layer", None) or (None, None)
    if offloader is None or offloader.block is None:
        return None
    keeper = offloader.block
    if recomputing():
        return (keeper, slot, True) if keeper.has(slot) else None
    return keeper, slot, False


def kept_attention(attend):
    """attend() -> an attention output, run through the AttentionKeeper of the offloaded layer now running (kept in
    the forward pass, answered from what was kept in the recompute), or plainly outside such a layer."""
    offloader, slot = getattr(_STATE, "layer", None) or (None, None)
    if offloader is None or offloader.attention is None:
        return attend()
    return offloader.attention.run(slot, recomputing(), attend)


class LayerInputOffloader:
    """The saved inputs of one forward pass, in layer order. offload=False keeps them on the device: plain
    per-layer recompute through the same path (cheaper than torch.utils.checkpoint's saved-tensor hooks)."""

    def __init__(self, device: torch.device, offload: bool = True, host_bytes: int | None = None):
        """host_bytes: the most pinned host memory this store may fill (default: all of host_offload_budget())."""
        self.device = device
        self.side = side_stream(device) if device.type == "cuda" and offload else None
        self.slots: list[dict | None] = []
        self.copying: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # (tensor, its copy's event): release_copied
        budget = host_offload_budget() if host_bytes is None else host_bytes
        self.host_left = budget if self.side is not None else 0
        self.attention = None  # an AttentionKeeper when the layers' attention outputs are kept (keep_attention)
        self.block = None  # a BlockKeeper when their q/k/v and post-attention residuals are kept too (keep_block)

    def keep_attention(self, layers: int, input_bytes: int, output_bytes: int) -> bool:
        """Also keep each layer's attention output (models/kept_attention.py), when the host budget holds `layers`
        layer inputs and outputs (bytes each); the inputs come first, so very long sequences keep only those.
        Returns whether outputs are kept."""
        if self.side is not None and self.host_left < layers * (input_bytes + output_bytes):
            return False
        from fasttune.models.kept_attention import AttentionKeeper

        share = layers * output_bytes if self.side is not None else 0
        self.host_left -= share
        self.attention = AttentionKeeper(LayerInputOffloader(self.device, self.side is not None, host_bytes=share))
        return True

    def keep_block(self, layers: int, input_bytes: int, layer_bytes: int) -> bool:
        """Also keep each layer's q/k/v and post-attention residual (models/kept_block.py; `layer_bytes` per layer),
        when the attention outputs are kept and the host budget left holds them and the `layers` layer inputs
        (`input_bytes` each, saved later). Returns whether they are kept."""
        if self.attention is None or (self.side is not None and
                                      self.host_left < layers * (input_bytes + layer_bytes)):
            return False
        from fasttune.models.kept_block import BlockKeeper

        share = layers * layer_bytes if self.side is not None else 0
        self.host_left -= share
        self.block = BlockKeeper(LayerInputOffloader(self.device, self.side is not None, host_bytes=share))
        return True

    def save(self, x: torch.Tensor) -> int:
        """Keep a layer's input x until backward and return its slot index for `load`: copied to a pinned host buffer on
        the side stream, or kept on the device (the tensor itself, detached) without offloading, on a CPU, or once the
        host budget (host_offload_budget) is used up. An offloaded x stays referenced until `release_copied`."""
        nbytes = x.numel() * x.element_size()
        if self.side is None or nbytes > self.host_left:
            # Kept on the device: no offloading asked for, a CPU, or host memory is used up (very long
            # sequences: the remaining layers' inputs stay on the GPU instead of the OS killing the process).
            # The tensor itself is kept: a layer never writes into its input.
            self.slots.append({"dev": x.detach(), "event": None})
            return len(self.slots) - 1
        self.host_left -= nbytes
        buf = _POOL.get(nbytes)
        host = buf[:nbytes].view(x.dtype).view(x.shape)
        self.side.wait_stream(torch.cuda.current_stream(self.device))  # x must be computed before it is copied
        with torch.cuda.stream(self.side):
            host.copy_(x, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side)
        # x stays referenced until the main stream has waited for its copy (release_copied), not record_stream'd:
        # a block freed with a pending side-stream use is held back from every allocation until the GPU has run
        # that copy, and Python runs layers ahead of the GPU, so at 32K tokens such held blocks grew the cache by
        # tens of GiB. Freed after the main stream's wait, the block is reused in stream order at once.
        self.copying.append((x, copied))
        self.slots.append({"host": host, "buf": buf, "dev": None, "event": None})
        return len(self.slots) - 1

    def release_copied(self):
        """Let go of the device tensors whose host copies `save` started (this store's and its keepers'): the main
        stream waits for the copies (in stream order; the host does not wait), then the references are dropped, so
        their memory goes to the main stream's next allocations. Called as each offloaded layer starts (its
        predecessor's copies had that layer's time), after the last one, and by `load`."""
        for store in (self, *(k.store for k in (self.attention, self.block) if k is not None)):
            if store.copying:
                # One side stream runs the copies in order: waiting for the last one waits for them all.
                torch.cuda.current_stream(store.device).wait_event(store.copying[-1][1])
                store.copying = []

    def __del__(self):
        # A forward whose backward never ran (an exception, or a graph dropped unused) still holds host
        # buffers: wait for their copies, then give them back to the pool instead of leaking page-locked memory.
        leftovers = [slot["buf"] for slot in self.slots if slot is not None and "buf" in slot]
        if leftovers or getattr(self, "copying", None):
            self.side.synchronize()  # (also: no copy may still read a tensor freed with `copying`)
            for buf in leftovers:
                _POOL.put(buf)

    def fetch(self, i: int):
        """Start copying entry i back to the device on the side stream (no-op if it is there already). The device
        tensor is allocated from the main stream's blocks (a side stream's freed blocks serve only that stream, and
        its cache grew by a layer's values each time Python ran ahead of the GPU); the copy waits for the work
        already queued on the main stream, which may still use the memory it gets."""
        slot = self.slots[i]
        if slot is None or slot["dev"] is not None:
            return  # freed, fetched already, or never left the device
        main = torch.cuda.current_stream(self.device)
        dev = torch.empty(slot["host"].shape, dtype=slot["host"].dtype, device=self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            dev.copy_(slot["host"], non_blocking=True)
            slot["event"] = torch.cuda.Event()
            slot["event"].record(self.side)
        slot["dev"] = dev

    def load(self, i: int, prefetch: bool = True) -> torch.Tensor:
        """Entry i (layer i's input) on the device; with `prefetch`, starts bringing back entry i-1. The host never
        waits here: the main stream waits for the copy, and the host buffer returns to the pool with its event."""
        slot = self.slots[i]
        if self.side is not None:
            self.release_copied()  # (backward has begun: the forward pass's last copies)
            self.fetch(i)
            if slot["event"] is not None:
                torch.cuda.current_stream(self.device).wait_event(slot["event"])
                _POOL.put(slot["buf"], slot["event"])
            if prefetch and i > 0:
                self.fetch(i - 1)
        self.slots[i] = None  # frees the host copy once backward no longer needs it
        return slot["dev"]


def rng_states(device: torch.device) -> tuple:
    """(CPU state, CUDA state of `device` or None): what a recompute restores so that dropout (LoRA's) draws the
    forward pass's masks again."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_rng(states: tuple, device: torch.device):
    """Run the block with the random states `states` (from rng_states) and put the current ones back after."""
    cpu, cuda = states
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class _OffloadedLayer(torch.autograd.Function):
    """run(x) with x offloaded; `anchor` (an empty tensor that requires grad) makes the output part of the graph
    even when x does not require grad (the first layer's input comes from a frozen embedding)."""

    @staticmethod
    def forward(ctx, x, anchor, run, offloader, *extras):
        """run(x, *extras) without a graph inside the layer; x is saved by `offloader`, with the RNG states for the
        replay; extras (further tensor inputs: Gemma 4's per-layer input and shared keys / values) stay on the
        device as they are."""
        ctx.set_materialize_grads(False)  # a second output (MoE router logits) may get no gradient
        ctx.run, ctx.offloader = run, offloader
        offloader.release_copied()  # the layer before's copies had its time: its tensors' memory may be reused
        ctx.slot = offloader.save(x)
        ctx.x_requires_grad = x.requires_grad
        ctx.extras_require_grad = [e.requires_grad for e in extras]
        ctx.save_for_backward(*extras)
        ctx.rng = rng_states(x.device)  # dropout in LoRA must draw the same masks in the recompute
        with torch.no_grad(), _layer_scope(offloader, ctx.slot, recompute=False):
            return run(x, *extras)

    @staticmethod
    def backward(ctx, *grads):
        """Recompute run from the saved input and back-propagate grads (one per output, None where unused)
        through it -> (dx or None, None, None, None, d(extra) or None for each extra)."""
        # The first layer's input (a frozen embedding's rows) needs no gradient: its d(input) GEMMs are not run.
        x = ctx.offloader.load(ctx.slot).detach().requires_grad_(ctx.x_requires_grad)
        extras = [e.detach().requires_grad_(r) for e, r in zip(ctx.saved_tensors, ctx.extras_require_grad)]
        with replayed_rng(ctx.rng, x.device), torch.enable_grad(), \
                _layer_scope(ctx.offloader, ctx.slot, recompute=True):
            out = ctx.run(x, *extras)
        # LoRA grads accumulate here, as in a reentrant checkpoint. `run` may return several tensors (an MoE
        # layer's output and its router logits): each one that got a gradient is back-propagated.
        # (An output that needs no gradient: a layer without trainable parameters whose input needs none either.)
        pairs = [(o, g) for o, g in zip(out if isinstance(out, tuple) else (out,), grads)
                 if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return ((x.grad if ctx.x_requires_grad else None), None, None, None,
                *(e.grad if e.requires_grad else None for e in extras))


def offloaded_layer(run, x: torch.Tensor, offloader: LayerInputOffloader, anchor: torch.Tensor,
                    extras: tuple = ()) -> torch.Tensor:
    """run(x, *extras) without building a graph inside the layer (output: a tensor, or a tuple such as an MoE layer's
    output and router logits); x is kept by `offloader` and backward recomputes run from it, with the forward's RNG
    state, and back-propagates through it (also into the extras: further tensor inputs, kept on the device).
    `anchor`: an empty tensor that requires grad, so the output joins the graph even when x does not."""
    return _OffloadedLayer.apply(x, anchor, run, offloader, *extras)
