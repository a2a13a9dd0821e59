"""The attention block's results kept from the forward pass, so that the "offload" recompute skips its projections.

With use_gradient_checkpointing="offload", backward re-runs each decoder layer from its input. The attention half of
that re-run (input norm, q/k/v projections, RoPE, attention, o_proj, residual add) only rebuilds values the forward
pass already had: what backward needs from it is q, k and v as the attention kernel saw them (after RoPE), the
attention output (kept by models/kept_attention.py) and the residual stream after the attention (the input of
post_attention_layernorm). Here the forward pass keeps q, k, v and that residual in pinned host memory, beside the
layer input; in the recompute the q/k/v and o_proj base GEMMs are skipped (their LoRA products still run) and the
kept values take the places of the values they would have made, through `_Substitute`: forward returns the kept
value, backward hands the gradient to the skipped computation's output, so every gradient flows through the same
graph with the same values. On the 8B shape that is about a fifth of a recomputed layer's GEMM work.

Only layers whose skipped values feed nothing else take part (see `Attention.keeps_block`): no q/k norm (its
backward needs the projections' values), no fused qkv_proj, no attention sinks, and no sandwich norm (Gemma 2 norms
o_proj's output).
"""
from __future__ import annotations

import torch

# GPU arithmetic per byte over the host link: ~700 TFLOP/s of bf16 GEMMs over ~50 GB/s of pinned PCIe 5 copies (an
# H200; an A100 over PCIe 4 is alike). Measured: on the 8B shape at 2 x 2048 tokens, keeping the block (144 MiB of
# copies a layer) took the forward pass from compute-bound to copy-bound, 12,412 -> 12,068 tokens/s; at 32,768 tokens
# the attention's arithmetic hides the copies, 7,745 -> 8,111.
FLOP_PER_HOST_BYTE = 14_000


def block_pays(arch, seq_len: int, element_size: int) -> bool:
    """Whether keeping the attention block is worth its copies for `arch` (a ModelConfig) at `seq_len` tokens a row:
    a layer's forward arithmetic per token (its projections and MLP, top-k experts for MoE layers, and causal
    attention over seq_len / 2 keys on average) must cover copying everything "offload" keeps per token (the
    layer input, the attention output, q/k/v and the residual) at FLOP_PER_HOST_BYTE."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    mlp = 3 * h * (arch.moe_intermediate_size * arch.num_experts_per_tok if any(arch.moe_layers) else
                   arch.intermediate_size)
    flops = 2 * (h * (2 * q + 2 * kv) + mlp) + 2 * seq_len * q  # per token: 2 per weight; QK^T and PV, causal
    kept = (3 * h + 2 * q + 2 * kv) * element_size  # input, residual, attention output, q, k, v
    return flops >= kept * FLOP_PER_HOST_BYTE


class _Substitute(torch.autograd.Function):
    """value in the place of the sum of `parts` (or of the one part): forward returns value, backward gives each part
    the gradient, as a sum would. The parts' values are never read."""

    @staticmethod
    def forward(ctx, value, *parts):
        """value: the kept tensor; parts: the tensors (same shape) whose sum it stands for. Returns value."""
        ctx.n = len(parts)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        """grad -> (None, grad for each part)."""
        return (None, *([grad] * ctx.n))


class BlockKeeper:
    """The kept attention-block values of one forward pass: {layer slot: {name: index in store}}. `store` is a
    LayerInputOffloader (pinned host memory on CUDA, the device otherwise). `replays` counts recomputed layers that
    used kept values (tests read it)."""

    def __init__(self, store):
        self.store = store
        self.records: dict[int, dict[str, int]] = {}
        self.replays = 0

    def keep(self, slot: int, name: str, t: torch.Tensor):
        """Keep t (detached) as `name` of the layer in `slot`."""
        self.records.setdefault(slot, {})[name] = self.store.save(t.detach())

    def has(self, slot: int) -> bool:
        """Whether the layer in `slot` kept its values in the forward pass (and they are not used up)."""
        return slot in self.records

    def take(self, slot: int, name: str) -> torch.Tensor:
        """The kept `name` of layer `slot` on the device; the first take of a layer starts bringing back every value
        of the layer before it, so those copies overlap this layer's backward."""
        record = self.records[slot]
        index = record.pop(name)
        if not record:
            del self.records[slot]
            self.replays += 1
        earlier = self.records.get(slot - 1)
        if earlier and self.store.side is not None:
            for i in earlier.values():
                self.store.fetch(i)
        return self.store.load(index, prefetch=False)

    def substitute(self, slot: int, name: str, *parts: torch.Tensor) -> torch.Tensor:
        """The kept `name` of layer `slot`, joined to the graph in place of the sum of `parts` (see _Substitute)."""
        return _Substitute.apply(self.take(slot, name), *parts)
