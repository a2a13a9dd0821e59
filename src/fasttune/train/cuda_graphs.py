"""The SFT micro-batch's forward and backward captured in one CUDA graph and replayed (TrainingConfig.cuda_graphs).

Why: a LoRA step of a mixture-of-experts model issues ~10,000 small kernels; the host spends about as long queueing
them as the GPU spends running them, so the GPU waits. A replayed graph queues the whole forward and backward in
one call. The technique is PyTorch's "whole-network capture" (torch.cuda.graphs, CUDA Graphs in the PyTorch docs):
static input buffers, capture once, refill the buffers and replay.

What a replay needs, and how it is kept:
- fixed shapes: each batch is padded into static (rows, length) buffers (pad token ids, labels -100), one graph per
  shape; padded rows and positions carry no loss and add nothing to any gradient;
- no host syncs and no data-dependent shapes inside: the attention runs as plain causal attention (right padding
  only: a causal query never sees the padding after it), and the fused cross-entropy keeps every row
  (kernels/cross_entropy.py, compact=False);
- gradients accumulated in place into the same `.grad` tensors: they are allocated before the capture and
  re-attached (zeroed) when an optimizer's zero_grad(set_to_none=True) dropped them;
- the loss normaliser (num_items_in_batch) is a device tensor, refilled before each replay.

Each shape first runs once eagerly, exactly as it will be captured (the Triton kernels compile and cuDNN builds its
plans outside the capture); the next batch of that shape is captured and every later one replayed. All graphs share
one memory pool. A capture that fails (an operation CUDA cannot capture) turns the graphs off for the run with a
message, and the batch runs eagerly: the result is the same, only slower.
"""
from __future__ import annotations

import sys

import torch

from fasttune.constants import IGNORE_INDEX
from fasttune.errors import ConfigError
from fasttune.kernels.dispatch import replayed_launches

MAX_GRAPHS = 8  # shapes captured at most; later new shapes run eagerly (each graph holds its own kernel list)


def refusal(model, args) -> str | None:
    """Why `model` cannot train with cuda_graphs=True under `args` (a TrainingConfig), or None when it can. Checked
    before training starts, after gradient_checkpointing="auto" is resolved."""
    from fasttune.kernels.embedding import device_reads_host
    from fasttune.models.causal_lm import CausalLM
    from fasttune.models.host_embedding import HostEmbedding
    from fasttune.models.host_head import host_head

    if not isinstance(model, CausalLM):
        return ("it needs fasttune's own decoder; this model runs through the transformers fallback or is a "
                "vision-language model")
    mode = model.gradient_checkpointing
    if mode not in (True, False):
        return (f"use_gradient_checkpointing={mode!r} copies layer inputs to the host during the step, which a "
                f"graph cannot hold; use True (recompute on the GPU) or False")
    if host_head(model) is not None:
        return "offload_lm_head streams the head from host memory in tiles, which a graph cannot hold"
    if bool(getattr(model.config, "output_router_logits", False)) and model.arch.num_experts > 0:
        return ("the mixture-of-experts load-balancing loss is on (config.output_router_logits; SFTConfig's "
                "router_aux_loss_coef, by default the config's, as in TRL): it counts the real tokens through the "
                "attention mask, which the graph does not take; set router_aux_loss_coef=0.0")
    if args.fp16:
        return "fp16 needs loss scaling, which the graph does not hold; use bf16"
    if args.fsdp:
        return "fsdp=True gathers and reduce-scatters inside the step; use plain data parallelism (torchrun)"
    if args.packing:
        return "packing=True needs per-document attention (variable shapes); set packing=False"
    if model.device.type != "cuda":
        return f"it needs a CUDA GPU; the model is on {model.device}"
    # offload_embedding's rows are read from pinned host memory by a kernel, which a graph holds like any other;
    # only a device that cannot address host memory looks them up on the host (a sync).
    if isinstance(model.model.embed_tokens, HostEmbedding) and not device_reads_host(model.device):
        return (f"offload_embedding on {torch.cuda.get_device_name(model.device)} looks the rows up on the host "
                f"(the device cannot read host memory), which a graph cannot hold")
    return None


def check(model, args):
    """Raise ConfigError when cuda_graphs=True cannot apply (see `refusal`)."""
    why = refusal(model, args)
    if why is not None:
        raise ConfigError(f"cuda_graphs=True does not apply here: {why}. Or set cuda_graphs=False.")


class _Captured:
    """One shape's static buffers and graph."""

    def __init__(self, rows: int, length: int, device, pad: int):
        self.ids = torch.full((rows, length), pad, dtype=torch.long, device=device)
        self.labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long, device=device)
        self.num_items = torch.ones((), dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss_sum: torch.Tensor | None = None
        self.stats: tuple | None = None  # (token_stats, target_count) of the captured forward, when asked for


class CudaGraphStep:
    """Forward + backward of SFT micro-batches through CUDA graphs, one per padded batch shape.

    model: fasttune's CausalLM on a CUDA device, in the training mode it will keep (see `refusal`).
    pad_token_id: the id written into padded positions (any id works: they are masked out of the loss).
    rows, length: pad every batch up to this many rows / tokens (None: the batch's own size), so that a run with
    varying batch sizes or lengths needs one graph; a batch larger than either keeps its own size.
    """

    def __init__(self, model, pad_token_id: int = 0, rows: int | None = None, length: int | None = None,
                 max_graphs: int = MAX_GRAPHS):
        self.model, self.pad = model, int(pad_token_id)
        self.rows, self.length, self.max_graphs = rows, length, max_graphs
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads: list[torch.Tensor] | None = None  # the .grad tensors the graphs accumulate into
        self.shapes: dict[tuple, _Captured] = {}
        self.pool = None
        self.off_reason: str | None = None
        self.replays = 0
        self.token_stats: tuple | None = None  # the last run's (token_stats, target_count) copies, when asked for
        self.extra: dict = {}  # the model keywords of the current run

    def accepts(self, batch: dict, right_padded: bool) -> bool:
        """Whether `batch` can take the graph path: only input_ids / attention_mask / labels, the mask (if any)
        right padding only (`right_padded`, decided by the caller on the host), graphs not turned off."""
        return (self.off_reason is None and right_padded
                and set(batch) <= {"input_ids", "attention_mask", "labels"})

    def run(self, batch: dict, num_items: int | float, extra: dict | None = None) -> torch.Tensor:
        """Forward and backward of one micro-batch whose `accepts` is True: the loss sum / num_items is
        back-propagated into the parameters' .grad (accumulated, as loss.backward() does). batch: input_ids and
        labels (B, T) int64 on the model's device; extra: further model keywords (the trainer's loss_kwargs: with
        return_token_stats, `token_stats` holds this run's (token_stats, target_count) after it). Returns the
        micro-batch's cross-entropy sum (fp32 () tensor on the device, not read)."""
        self.extra = extra or {}
        ids, labels = batch["input_ids"], batch["labels"]
        b, t = ids.shape
        key = (max(b, self.rows or 0), max(t, self.length or 0), self.model.training, self.model.gradient_checkpointing,
               getattr(self.model, "recompute_layers", None))
        slot = self.shapes.get(key)
        if slot is None and len(self.shapes) >= self.max_graphs:
            return self._eager(ids, labels, num_items)
        if slot is None:
            slot = self.shapes[key] = _Captured(key[0], key[1], ids.device, self.pad)
            self._fill(slot, ids, labels, num_items)
            loss_sum = self._forward_backward(slot).detach().clone()  # the shape's eager warm-up
            self.token_stats = self._copied(slot.stats)
            return loss_sum
        self._bind_grads()
        self._fill(slot, ids, labels, num_items)
        if slot.graph is None:
            try:
                self._capture(slot)
            except Exception as e:  # an op CUDA cannot capture: the run goes on eagerly
                while e.__context__ is not None:  # the capture's end re-raises; the first error names the op
                    e = e.__context__
                self.off_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"fasttune: cuda_graphs turned off for this run, the capture failed ({self.off_reason}); "
                      f"training continues without graphs.", file=sys.stderr)
                self.shapes.clear()
                return self._eager(ids, labels, num_items)
        slot.graph.replay()
        self.replays += 1
        self.token_stats = self._copied(slot.stats)
        return slot.loss_sum.clone()

    @staticmethod
    def _copied(stats: tuple | None) -> tuple | None:
        return None if stats is None else tuple(t.clone() for t in stats)  # the next replay overwrites them

    def _eager(self, ids, labels, num_items) -> torch.Tensor:
        out = self.model(input_ids=ids, labels=labels, num_items_in_batch=num_items, return_logits=False,
                         **self.extra)
        out.loss.backward()
        self.token_stats = None if out.token_stats is None else (out.token_stats, out.target_count)
        return out.loss_sum.detach()

    def _fill(self, slot: _Captured, ids: torch.Tensor, labels: torch.Tensor, num_items):
        b, t = ids.shape
        if (b, t) != tuple(slot.ids.shape):
            slot.ids.fill_(self.pad)
            slot.labels.fill_(IGNORE_INDEX)
        slot.ids[:b, :t].copy_(ids)
        slot.labels[:b, :t].copy_(labels)
        slot.num_items.fill_(float(num_items))

    def _forward_backward(self, slot: _Captured) -> torch.Tensor:
        with replayed_launches():  # the warm-up takes the paths the capture will (their kernels compile here)
            out = self.model(input_ids=slot.ids, labels=slot.labels, num_items_in_batch=slot.num_items,
                             return_logits=False, **self.extra)
            out.loss.backward()
        slot.stats = None if out.token_stats is None else (out.token_stats, out.target_count)
        return out.loss_sum.detach()

    def _bind_grads(self):
        """Make every trainable parameter's .grad the tensor the graphs write into: allocated (zeros) at the first
        capture; re-attached and zeroed where zero_grad(set_to_none=True) dropped it; where another tensor was put
        there, its values are copied in."""
        if self.grads is None:
            self.grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        dropped = []
        for p, g in zip(self.params, self.grads):
            if p.grad is g:
                continue
            if p.grad is None:
                dropped.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if dropped:
            torch._foreach_zero_(dropped)

    def _capture(self, slot: _Captured):
        # Eager blocks cached since the warm-up cannot serve the graph's private pool: give them back first.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        device = slot.ids.device.index if slot.ids.device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[device]
        before = generator.clone_state()  # a copy: not marked as capturing
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss_sum = self._forward_backward(slot)
        except Exception:
            # torch leaves the generator of an aborted capture marked as capturing, and every later random op
            # (dropout, init) would fail; nothing ran, so its state before the capture is the right one
            generator.graphsafe_set_state(before)
            raise
        # The capture recorded the kernels without running them: the gradients are still what they were.
        slot.graph, slot.loss_sum = graph, loss_sum
        if self.pool is None:
            self.pool = graph.pool()


def cuda_graph_step_for(trainer) -> "CudaGraphStep":
    """The CudaGraphStep of a trainer's args.cuda_graphs=True: every batch padded to per_device_train_batch_size
    rows of the longest training example, so one graph serves the run. Raises ConfigError where graphs cannot
    apply (another objective, a vision model, an "auto" choice of "offload", and what check() refuses)."""
    if not trainer.supports_cuda_graphs or getattr(trainer, "vision", False):
        raise ConfigError(f"cuda_graphs=True applies to SFTTrainer on text models; {type(trainer).__name__}'s "
                          f"loss is not captured. Set cuda_graphs=False.")
    if getattr(trainer, "_auto_offload", False):
        raise ConfigError("cuda_graphs=True does not apply here: use_gradient_checkpointing='auto' chose "
                          "'offload' (by its estimate even recompute on the GPU does not fit this batch), and "
                          "host copies cannot run inside a graph. Lower per_device_train_batch_size or "
                          "max_seq_length, or set cuda_graphs=False.")
    check(trainer.model, trainer.args)
    lengths = [trainer.example_tokens(ex) for ex in trainer.train_examples]
    longest, mean, rows = max(lengths), sum(lengths) / len(lengths), trainer.args.per_device_train_batch_size
    if trainer.dist.is_main:
        waste = (f"; the examples average {mean:,.0f} tokens, so about {1 - mean / longest:.0%} of each batch is "
                 f"padding (graphs suit examples of similar length)" if mean < 0.75 * longest else "")
        print(f"fasttune: cuda_graphs on: each micro-batch runs padded to {rows} x {longest:,} tokens (the "
              f"longest example){waste}.", file=sys.stderr)
    return CudaGraphStep(trainer.model, trainer.pad_id, rows=rows, length=longest)
