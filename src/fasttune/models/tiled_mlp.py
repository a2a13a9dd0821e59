"""The gated MLP over a long sequence in tiles, each tile recomputed in backward; nothing computed whose value is unused.

At long sequences the MLP's (tokens x intermediate) activations are the largest tensors of a layer (at 131,072 tokens
on an 8B shape, 3.5 GiB each in bf16), so the MLP runs over the sequence in tiles and keeps only its input: backward
recomputes one tile at a time and back-propagates through it. torch.utils.checkpoint does that too, but it cannot know
what the recompute does not need:
- the tile's down_proj output: backward needs only its graph (down_proj's base GEMM is skipped, kernels/lora.py);
- the whole forward when the MLP runs inside a layer that is itself being recomputed ("offload"/True: the layer's output
  value is discarded, see models/offload.py). Checkpointed tiles there ran the MLP three times (forward pass, layer
  recompute, tile recompute); here the layer recompute skips it and only backward's tile recompute runs.
The dropout masks (LoRA dropout) are the forward pass's: the random state at the MLP's start is kept and restored.
"""
from __future__ import annotations

import torch

from fasttune.models.offload import replayed_rng, rng_states


class _TiledMLP(torch.autograd.Function):
    """mlp over x in sequence tiles; backward recomputes each tile and back-propagates into x and the parameters
    (their .grad accumulates inside backward, as in a reentrant checkpoint). `anchor`: an empty tensor that requires
    grad, so the output joins the graph even when x does not."""

    @staticmethod
    def forward(ctx, x, anchor, mlp, tile, values_unused):
        """x (B, T, H); mlp(chunk, values_unused=...) -> (B, t, H); tile: positions per tile. With values_unused the
        returned value is a zero placeholder (its graph is all that is used)."""
        ctx.mlp, ctx.tile, ctx.x_requires_grad = mlp, tile, x.requires_grad
        ctx.save_for_backward(x)
        ctx.rng = rng_states(x.device)
        if values_unused:
            return x.new_zeros(()).expand(x.shape)
        with torch.no_grad():
            return torch.cat([mlp(c) for c in x.split(tile, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        """Recompute tile by tile (down_proj's base GEMM skipped) and back-propagate grad's slice through each ->
        (dx or None, None, None, None, None)."""
        (x,) = ctx.saved_tensors
        # Each tile's d(input) is kept apart and joined at the end: a whole-sequence buffer made up front would sit
        # beside every tile's activations (the peak), the joined one only beside the tile gradients.
        dxs = []
        with replayed_rng(ctx.rng, x.device), torch.enable_grad():
            for start in range(0, x.shape[1], ctx.tile):
                part = x[:, start:start + ctx.tile].detach().requires_grad_(ctx.x_requires_grad)
                out = ctx.mlp(part, values_unused=True)
                if out.requires_grad:
                    torch.autograd.backward(out, grad[:, start:start + ctx.tile])
                if ctx.x_requires_grad:
                    dxs.append(part.grad if part.grad is not None else torch.zeros_like(part))
                del part, out  # the tile's graph and activations go before the next tile's are made
        return (torch.cat(dxs, dim=1) if dxs else None), None, None, None, None


def tiled_mlp(mlp, x: torch.Tensor, tile: int, values_unused: bool, trainable: bool) -> torch.Tensor:
    """mlp(x) computed over x's sequence in tiles of `tile` positions.

    mlp: a callable (chunk (B, t, H), values_unused=False) -> (B, t, H), applied per position (the gated MLP).
    values_unused: inside a layer recompute whose output value is discarded (models/offload.py): the forward computes
    nothing and returns zeros of x's shape; only backward's per-tile recompute runs.
    trainable: whether the MLP has parameters that require grad (with grad enabled and x or a parameter requiring grad,
    backward recomputes each tile; otherwise the tiles simply run without a graph).
    Returns (B, T, H) in x's dtype."""
    if not torch.is_grad_enabled() or not (trainable or x.requires_grad):
        with torch.no_grad():
            return torch.cat([mlp(c) for c in x.split(tile, dim=1)], dim=1)
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _TiledMLP.apply(x, anchor, mlp, tile, values_unused)
