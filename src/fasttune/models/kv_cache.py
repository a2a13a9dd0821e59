"""The key/value cache of generation, below the decoder (which reads and extends it) and generate.py (which
creates it)."""
from __future__ import annotations

import torch

from fasttune.models.config import ModelConfig


class KVCache:
    """Keys and values of the positions seen so far, per layer, preallocated for `max_len` positions (generation).

    Each layer writes its new keys/values at `length` and attends over everything up to them; the model advances
    `length` once all layers have run. Sliding-window layers keep every position too: their mask drops old ones.

    Decode mode (`start_decoding`, models/static_decode.py): one token per row is written at the device-side slot
    `slot` ((1,) int64) and every read returns the first `read_len` slots (a length fixed by the caller, not the
    slot), so a decode step has fixed shapes and reads no host value (what a CUDA graph needs); the mask then hides
    the slots not written yet.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        flags = getattr(cfg, "linear_layers", None) or []  # (a transformers model's config has none)
        linear = [bool(flags and flags[i]) for i in range(cfg.num_layers)]
        # Qwen3.5's and LFM2's linear layers keep no keys/values (empty tensors) but a conv history (and a state)
        # multi-head latent attention (models/mla.py) caches, as transformers does, one "key" per position: the normed
        # kv latent and the rotated key part (kv_lora_rank + head_dim wide), shared by all heads; no values
        rank = getattr(cfg, "kv_lora_rank", 0)

        def shape(i: int, n: int) -> tuple:
            """(batch, heads, n, key width, value width) of layer i's cache for n positions."""
            c = cfg.layer_config(i) if hasattr(cfg, "layer_config") else cfg  # Gemma 4: per-layer head sizes
            return (batch, 1, n, rank + c.head_dim, 0) if rank else (batch, c.num_kv_heads, n, c.head_dim, c.head_dim)

        # (Gemma 4's shared key/value layers read an earlier layer's cache and keep none)
        # (and Llama 3.2 Vision's cross-attention layers keep their image keys / values in `cross` instead)
        cross = set(getattr(cfg, "cross_attention_layers", None) or ())
        # (and a Nemotron-H layer whose mixer is an MLP attends to nothing)
        kinds = getattr(cfg, "layer_kinds", None) or []
        shared = [hasattr(cfg, "kv_source") and cfg.kv_source(i) is not None or i in cross
                  or (bool(kinds) and kinds[i] in ("mlp", "moe")) for i in range(cfg.num_layers)]
        both = getattr(cfg, "parallel_mamba", False)  # (Falcon-H1: every layer attends and runs a Mamba mixer)
        shapes = [shape(i, 0 if (lin and not both) or sh else max_len)
                  for i, (lin, sh) in enumerate(zip(linear, shared))]
        self.keys = [torch.zeros(s[:4], dtype=dtype, device=device) for s in shapes]
        self.values = [torch.zeros(s[:3] + s[4:], dtype=dtype, device=device) for s in shapes]
        # per linear layer: the conv's last kernel - 1 inputs (B, channels, kernel - 1), and for a gated DeltaNet
        # the delta-rule state (B, value heads, d_k, d_v) fp32 (models/gated_deltanet.py, models/short_conv.py)
        # and for a Mamba-2 mixer x|B|C's history and the scan state (B, heads, head_dim, d_state) fp32 (mamba2.py)
        self.conv, self.recurrent = {}, {}
        kind = getattr(cfg, "linear_kind", "gated_deltanet")
        for i in (i for i, lin in enumerate(linear) if lin):
            if kind == "gated_deltanet":
                channels = 2 * cfg.linear_key_heads * cfg.linear_key_dim + cfg.linear_value_heads * cfg.linear_value_dim
                self.recurrent[i] = torch.zeros(batch, cfg.linear_value_heads, cfg.linear_key_dim,
                                                cfg.linear_value_dim, device=device)
            elif kind == "mamba2":
                channels = cfg.mamba_heads * cfg.mamba_head_dim + 2 * cfg.mamba_groups * cfg.mamba_state
                self.recurrent[i] = torch.zeros(batch, cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_state,
                                                device=device)
            else:
                channels = cfg.hidden_size
            self.conv[i] = torch.zeros(batch, channels, cfg.linear_conv_kernel - 1, dtype=dtype, device=device)
        # Llama 3.2 Vision: per cross-attention layer the image's (keys, values) (B, kv heads, V, head_dim), written
        # at the prefill, and the prompt's last CrossInputs row that every later step uses (models/cross_attention.py)
        self.cross: dict = {}
        self.cross_last = None
        self.max_len, self.length, self.written = max_len, 0, 0
        self.slot: torch.Tensor | None = None
        self.read_len = max_len

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write layer `layer_idx`'s new k, v (B, num_kv_heads, T_new, head_dim) at positions length..length + T_new and
        return that layer's keys and values up to them, (B, num_kv_heads, length + T_new, head_dim) each (views into the
        cache). Does not advance `length`. Raises ValueError past max_len. In decode mode (T_new = 1): written at
        `slot`, and the first `read_len` slots (B, num_kv_heads, read_len, head_dim) are returned."""
        if self.slot is not None:
            self.keys[layer_idx].index_copy_(2, self.slot, k)
            self.values[layer_idx].index_copy_(2, self.slot, v)
            return self.keys[layer_idx][:, :, :self.read_len], self.values[layer_idx][:, :, :self.read_len]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested.")
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        self.written = end  # what a layer reading another's cache attends over (Gemma 4's shared layers)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def start_decoding(self):
        """Enter decode mode at slot `length` (after the prompt's prefill)."""
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.keys[0].device)
