"""Generation's decode step: one new token per row over the whole preallocated KV cache, with fixed shapes and no
host reads, replayed as a CUDA graph on the GPU.

A step of the ordinary forward pass costs hundreds of kernel launches plus Python work per layer, and host
syncs (mask checks, slicing by a host length): at batch 1 a 1B model then decodes at ~80 tokens/s where the card's
bandwidth allows ~2,000. Here the step reads the cache in decode mode (models/kv_cache.py: keys/values written
at a device-side slot, whole buffers read) under a mask built on the device from that slot, so every tensor
keeps its address and shape from one token to the next. On CUDA the step is captured once per generate() call
(`torch.cuda.CUDAGraph`, after one eager warm-up run on a side stream, as PyTorch's documentation prescribes) and
replayed for each token; the LoRA layers run unmerged inside it, so training goes on between rollouts. On the
CPU, and where capturing is off, the same step runs eagerly.

The values equal the ordinary forward's: a masked key contributes exp(-inf) = 0 to the softmax, so attending
over the whole buffer gives what attending over the written slots gives (greedy output is tested equal to
transformers' and to the cache-slicing path).
"""
from __future__ import annotations

import os

import torch

from fasttune.models.kv_cache import KVCache


def graphs_wanted(model, device: torch.device) -> bool:
    """Whether decode steps are captured as CUDA graphs: on CUDA, unless FASTTUNE_CUDA_GRAPHS=0, for models
    whose layers run without host reads (MoE routing sorts tokens by expert with data-dependent sizes, and
    offloaded or sharded weights move between steps: those decode eagerly)."""
    if device.type != "cuda" or os.environ.get("FASTTUNE_CUDA_GRAPHS", "1") == "0":
        return False
    return getattr(model.arch, "num_experts", 0) == 0


class DecodeStep:
    """Next-token logits for one new token per row, over `cache` in decode mode.

    Args: model (our CausalLM or VisionCausalLM), cache (a KVCache holding the prompt, `start_decoding()`
    called), key_mask ((B, max_len) bool: False at left padding; the slots of new tokens True), graph (capture a
    CUDA graph on the first call; see `graphs_wanted`).
    Call with token (B, 1) int64 and position (B, 1) int64 (the new token's RoPE position); returns logits
    (B, V) in the model dtype and advances the cache's slot. Raises ValueError past the cache's max_len."""

    def __init__(self, model, cache: KVCache, key_mask: torch.Tensor, graph: bool):
        self.model, self.cache, self.graph = model, cache, graph
        decoder = model.model
        b, device = key_mask.shape[0], key_mask.device
        self.key_mask = key_mask.bool()
        self.token = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.slots = torch.arange(cache.max_len, device=device)
        self.windows = set(model.arch.sliding_windows) or {None}
        scale = model.arch.embed_scale
        self.embed_scale = None if scale is None else torch.tensor(scale, dtype=decoder.dtype, device=device)
        self.logits = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = None
        self._steps_left = cache.max_len - int(cache.slot)

    def _run(self) -> torch.Tensor:
        decoder, cache = self.model.model, self.cache
        visible = self.key_mask & (self.slots <= cache.slot)
        # build_masks' rule for a query at slot s: keys at slot j with s - j < window
        masks = {w: (visible if w is None else visible & (cache.slot - self.slots < w))[:, None, None, :]
                 for w in self.windows}
        if not self.model.arch.attn_logit_softcap:  # SDPA would turn a bool mask into this in every layer
            masks = {w: torch.zeros(m.shape, dtype=decoder.dtype, device=m.device).masked_fill_(~m, float("-inf"))
                     for w, m in masks.items()}
        x = decoder.embed_tokens(self.token).to(decoder.dtype)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        ropes = decoder.rope_tables(self.position, x.dtype)
        for layer in decoder.layers:
            x = layer(x, *ropes[layer.self_attn.rope_kind], masks, cache)
        return self.model.logits(decoder.norm(x)[:, -1])

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation, cuBLAS workspaces, cached RoPE tables
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._run()

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if self._steps_left <= 0:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions; one more was requested.")
        self.token.copy_(token)
        self.position.copy_(position)
        if not self.graph:
            logits = self._run()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self.logits
        self.cache.slot += 1
        self._steps_left -= 1
        return logits
