"""Generation's decode step: one new token per row over the preallocated KV cache, with fixed shapes and no host
reads, replayed as CUDA graphs on the GPU.

A step of the ordinary forward pass costs hundreds of kernel launches plus Python work per layer, and host
syncs (mask checks, slicing by a host length): at batch 1 a 1B model then decodes at ~80 tokens/s where the card's
bandwidth allows ~2,000. Here the step reads the cache in decode mode (models/kv_cache.py: keys/values written
at a device-side slot, whole buffers read) under a mask built on the device from that slot, so every tensor
keeps its address and shape from one token to the next. A step reads the cache up to the next multiple of
KV_BUCKET slots. On CUDA the step is captured once per bucket per generate() call (`torch.cuda.CUDAGraph`, after
one eager warm-up run on a side stream, as PyTorch's documentation prescribes; the buckets' graphs share one memory
pool) and replayed for each token; the LoRA layers run unmerged inside it, so training goes on between rollouts (their
16-bit factors are copied from the fp32 ones at each step's start, kernels/lora_casts.py). On the CPU, and where
capturing is off, the same step runs eagerly.

The values equal the ordinary forward's: a masked key contributes exp(-inf) = 0 to the softmax, so attending
over more slots gives what attending over the written slots gives (greedy output is tested equal to
transformers' and to the cache-slicing path).
"""
from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from fasttune.kernels import lora_casts
from fasttune.kernels.dispatch import kernel_choice
from fasttune.models.decoder import query_scales
from fasttune.models.gemma4 import per_layer_inputs
from fasttune.models.kv_cache import KVCache

# A step attends over the cache up to the next multiple of KV_BUCKET slots (capped at max_len), not the whole
# buffer: reading every slot of a long generation from its first token on would cost as much as the weights. One
# graph per bucket, captured when the slot first reaches it.
KV_BUCKET = 256


def graphs_wanted(model, device: torch.device) -> bool:
    """Whether decode steps are captured as CUDA graphs: on CUDA, unless FASTTUNE_CUDA_GRAPHS=0, for models
    whose layers run without host reads: mixture-of-experts models only where their experts take torch's grouped
    GEMM kernel (experts_capturable); the others decode eagerly. Not for Llama 3.2 Vision's cross-attention layers,
    whose image keys / values are new tensors (of each prompt's image count) at every call."""
    if device.type != "cuda" or os.environ.get("FASTTUNE_CUDA_GRAPHS", "1") == "0" or \
            getattr(model.arch, "cross_attention_layers", None):
        return False
    return getattr(model.arch, "num_experts", 0) == 0 or experts_capturable(model, device)


def experts_capturable(model, device: torch.device) -> bool:
    """Whether a mixture-of-experts model's expert GEMMs run on torch's grouped GEMM kernel, which takes the
    group sizes on the device (models/moe.py's grouped_mm_usable: bf16, compute capability >= 8.0, stacked weights
    whose rows are whole 16 bytes, NF4 stacks dequantised to bf16 alike); the padded-bmm fallback sizes its groups
    on the host, which a graph cannot hold. Routing and the grouping by expert read nothing on the host."""
    if model.model.dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    for module in model.modules():
        for name in ("gate_up_proj", "down_proj"):
            shape = getattr(getattr(module, name, None), "shape", None)
            if shape is not None and len(shape) == 3 and (shape[1] % 8 or shape[2] % 8):
                return False
    return True


class DecodeStep:
    """Next-token logits for one new token per row, over `cache` in decode mode.

    Args: model (our CausalLM or VisionCausalLM), cache (a KVCache holding the prompt, `start_decoding()`
    called), key_mask ((B, max_len) bool: False at left padding; the slots of new tokens True), graph (capture a
    CUDA graph when a step first reaches a KV_BUCKET; see `graphs_wanted`).
    Call with token (B, 1) int64 and position (B, 1) int64 (the new token's RoPE position); returns logits
    (B, V) in the model dtype and advances the cache's slot. Left out, token is the previous step's greedy token
    (`argmax`, (B,) int64, which each step also computes) and position the previous one plus 1. Raises ValueError
    past the cache's max_len."""

    def __init__(self, model, cache: KVCache, key_mask: torch.Tensor, graph: bool):
        self.model, self.cache, self.graph = model, cache, graph
        b, device = key_mask.shape[0], key_mask.device
        self.key_mask = key_mask.bool()
        self.token = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.argmax = torch.zeros(b, dtype=torch.long, device=device)  # the last step's greedy token per row
        self.slots = torch.arange(cache.max_len, device=device)
        self.windows = set(model.arch.sliding_windows) or {None}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self._pool = None  # one memory pool for all buckets' graphs (they never run at the same time)
        self._slot = cache.length  # the host's copy of cache.slot, so that choosing a bucket reads nothing
        self.casts = lora_casts.LoraCasts()  # the LoRA factors' 16-bit copies, refreshed at each step's start

    def _bucket(self) -> int:
        return min(self.cache.max_len, (self._slot // KV_BUCKET + 1) * KV_BUCKET)

    def _run(self, length: int) -> torch.Tensor:
        """The step attending over slots [0, length)."""
        with lora_casts.active(self.casts):
            self.casts.refresh()  # from the live fp32 factors, inside the graph too (training changes them)
            return self._layers(length)

    def _layers(self, length: int) -> torch.Tensor:
        decoder, cache = self.model.model, self.cache
        cache.read_len = length
        slots = self.slots[:length]
        visible = self.key_mask[:, :length] & (slots <= cache.slot)
        # build_masks' rule for a query at slot s: keys at slot j with s - j < window
        masks = {w: (visible if w is None else visible & (cache.slot - slots < w))[:, None, None, :]
                 for w in self.windows}
        if not self.model.arch.attn_logit_softcap:  # SDPA would turn a bool mask into this in every layer
            masks = {w: torch.zeros(m.shape, dtype=decoder.dtype, device=m.device).masked_fill_(~m, float("-inf"))
                     for w, m in masks.items()}
        x = decoder.embed_tokens(self.token).to(decoder.dtype)  # (Gemma's scale is inside embed_tokens)
        if self.model.arch.embedding_multiplier is not None:  # Granite
            x = x * self.model.arch.embedding_multiplier
        ropes = decoder.rope_tables(self.position, x.dtype)
        if self.model.arch.query_position_scale is not None:  # Ministral 3: from the device-side position
            masks["query_scale"] = query_scales(self.model.arch, self.position, x.dtype)
        masks["cross"] = cache.cross_last  # Llama 3.2 Vision: the prompt's image (None: its layers skipped)
        # Gemma 4's per-layer embeddings of the step's token (models/gemma4.py)
        ple = per_layer_inputs(decoder, self.token, x) if self.model.arch.per_layer_input_size else None
        h = None  # each layer's output stays x + h, the add done by the next norm's kernel
        for i, layer in enumerate(decoder.layers):
            x, h = layer.unsummed(x, h, *ropes[layer.mixer.rope_kind], masks, cache,
                                  None if ple is None else ple[:, :, i])
        logits = self.model.logits(decoder.final_norm.with_residual(x, h)[1][:, -1])
        # The next step's inputs, unless the caller gives others: the greedy token, the next position and slot.
        # Inside the graph these cost no launches of their own (greedy decoding then needs none per token).
        torch.argmax(logits, dim=-1, out=self.argmax)
        self.token.copy_(self.argmax[:, None])
        self.position.add_(1)
        cache.slot.add_(1)
        return logits

    def _capture(self, length: int):
        # what the warm-up step advances: the inputs, and Qwen3.5's linear-layer states (updated in place)
        advanced = [self.token, self.position, self.cache.slot, *self.cache.conv.values(),
                    *self.cache.recurrent.values()]
        inputs = [t.clone() for t in advanced]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation, cuBLAS workspaces, cached RoPE tables
            self._run(length)
        torch.cuda.current_stream().wait_stream(side)
        for t, saved in zip(advanced, inputs):  # the warm-up advanced them
            t.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(length)
        self._graphs[length] = (graph, logits)

    def __call__(self, token: torch.Tensor | None = None, position: torch.Tensor | None = None) -> torch.Tensor:
        if self._slot >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions; one more was requested.")
        if token is not None:
            self.token.copy_(token)
        if position is not None:
            self.position.copy_(position)
        length = self._bucket()
        if not self.graph:
            logits = self._run(length)
        else:
            if length not in self._graphs:
                self._capture(length)
            graph, logits = self._graphs[length]
            graph.replay()
        self._slot += 1
        return logits


class DecodeSession:
    """A KV cache of `capacity` slots for `batch` rows and its DecodeStep, whose CUDA graphs stay valid from one
    generate() call to the next: each call copies its prompt's keys/values into the same buffers and replays the
    graphs captured by an earlier call, so only the first call of a shape pays for capturing (two model steps
    and the graph's instantiation per KV bucket, ~30 ms for a 1B model).

    Args: model (our CausalLM or VisionCausalLM), batch (rows), capacity (slots; a multiple of KV_BUCKET),
    graph (capture CUDA graphs; see `graphs_wanted`). Built by `decode_session`, which also decides reuse."""

    def __init__(self, model, batch: int, capacity: int, graph: bool, key):
        device = model.device
        self.key, self.batch, self.capacity = key, batch, capacity
        self.cache = KVCache(model.arch, batch, capacity, model.dtype, device)
        self.cache.start_decoding()  # the slot tensor the graphs read; each call refills it
        self.step = DecodeStep(model, self.cache, torch.ones(batch, capacity, dtype=torch.bool, device=device), graph)

    def start(self, prompt: KVCache, rows: torch.Tensor | None, key_mask: torch.Tensor) -> DecodeStep:
        """Load a prefilled prompt and return the step to decode with.

        prompt: the KVCache the prompt ran into (its `length` slots are copied); rows (B,) int64: which prompt row
        each row continues (identical prompts prefilled once), or None for one each; key_mask (B, L) with
        L <= capacity: 0 at left padding, 1 at the prompt's and new tokens' slots."""
        t, cache = prompt.length, self.cache
        for dst, src in ((cache.keys, prompt.keys), (cache.values, prompt.values)):
            for d, s in zip(dst, src):
                d[:, :, :t].copy_(s[:, :, :t] if rows is None else s[:, :, :t].index_select(0, rows))
        for dst, src in ((cache.conv, prompt.conv), (cache.recurrent, prompt.recurrent)):  # Qwen3.5's linear layers
            for i, s in src.items():
                dst[i].copy_(s if rows is None else s.index_select(0, rows))
        pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))  # noqa: E731
        cache.cross = {i: (pick(k), pick(v)) for i, (k, v) in prompt.cross.items()}  # (Llama 3.2 Vision)
        cache.cross_last = None if prompt.cross_last is None else \
            prompt.cross_last if rows is None else prompt.cross_last.select(rows)
        cache.length = t
        cache.slot.fill_(t)
        mask = self.step.key_mask
        mask[:, :key_mask.shape[1]].copy_(key_mask.bool())
        mask[:, key_mask.shape[1]:] = True  # never reached this call; unwritten slots are hidden by the slot rule
        self.step._slot = t
        return self.step


# One session per model, dropped with the model (a weak key, so copies and pickles of the model never carry CUDA
# graphs) or by `release_decode_session`.
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, DecodeSession]" = weakref.WeakKeyDictionary()


def decode_session(model, batch: int, length: int, graph: bool) -> DecodeSession:
    """The model's DecodeSession for `batch` rows of up to `length` positions: the kept one when its shape fits and
    nothing its graphs read has changed (see `graph_state`), else a new one with capacity `length` rounded up to
    KV_BUCKET (the old one is released first)."""
    key = (batch, graph, model.dtype, graph_state(model))
    kept = _SESSIONS.get(model)
    if kept is not None and kept.key == key and kept.capacity >= length:
        return kept
    release_decode_session(model)
    capacity = -(-length // KV_BUCKET) * KV_BUCKET
    session = _SESSIONS[model] = DecodeSession(model, batch, capacity, graph, key)
    return session


def release_decode_session(model) -> None:
    """Free the model's kept KV cache and CUDA graphs (generate() does so after a call made in training mode, and
    `model.train()` does, so training never holds them)."""
    if _SESSIONS.pop(model, None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# What every nn.Module keeps (parameter/buffer/submodule tables, a dozen hook tables): skipped by graph_state,
# whose cost is a Python loop over the attributes of every module (~5 ms of each generate() call for a 1B model
# when these were walked too).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def graph_state(model) -> int:
    """A hash of what a captured decode step depends on besides its own buffers: every parameter's and buffer's
    address, dtype and shape, the tensors modules keep in attributes (cached RoPE tables, one level into dicts,
    lists and tuples), every module's plain settings (flags such as a LoRA layer's `disabled`, scalings, windows)
    and the kernel choice. Any change means the graphs would read stale memory or replay the wrong branch."""
    state = [kernel_choice(), repr(model.arch)]
    for module in model.modules():
        state.append((type(module), module.training))
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS:  # parameters and buffers: below; hook tables hold no tensors
                continue
            if isinstance(value, (bool, int, float, str, type(None))):
                state.append((name, value))
            elif isinstance(value, torch.Tensor):
                state.append((name, value.data_ptr(), value.dtype, tuple(value.shape)))
            elif isinstance(value, (dict, list, tuple)):
                items = value.values() if isinstance(value, dict) else value
                state.extend((name, t.data_ptr(), tuple(t.shape)) for t in items if isinstance(t, torch.Tensor))
    for t in list(model.parameters()) + list(model.buffers()):
        state.append((t.data_ptr(), t.dtype, tuple(t.shape)))
    return hash(tuple(state))
