"""Fused LoRA linear layers with a hand-derived backward, for one or several layers that read the same input
(q/k/v, gate/up, or a single o/down projection).

    out_i = x @ W_i^T (+ bias_i) + s_i * (drop_i(x) @ A_i^T) @ B_i^T

Forward: without dropout the A projections of all layers run as one GEMM (x read once); each B product is written
first and the base GEMM accumulates onto it (beta=1), so no separate add pass exists and the rank-r GEMM only
writes the output.
Backward, low-rank side first: gB_i = s_i * g_i @ B_i (tokens x r); dB_i = s_i * g_i^T @ xa_i; dA = gB^T @ x in
one GEMM for all layers; d(x) starts as the LoRA term and accumulates every base term with beta=1 GEMMs, where
autograd would allocate one (tokens x hidden) gradient per branch and add them up.
Saved for backward: x, the (tokens x r) products, the 16-bit A/B copies and, with dropout, the masks (1 byte per
element; the dropped input is rebuilt from x). The base weights are re-read (or dequantised again) in backward.
FP8 bases (quant/fp8_rows.py) multiply in FP8 instead (kernels/fp8.py): x is quantised once for the whole group,
the base GEMM writes the output and the low-rank product is added onto it (an FP8 GEMM does not accumulate onto
an existing output); in backward each layer's gradient is quantised and its FP8 product added to d(x).
In a decode step (no gradients) the 16-bit factors come from copies kept with the step (kernels/lora_casts.py) and
the low-rank terms of up to 128 rows take two Triton launches per group (kernels/lora_decode.py).

The torch reference is the plain module path (`LoraLinear.forward`: base, dropout, two matmuls, autograd).
Which layers take this path (plain, enabled LoRA layers on a frozen base) is decided in peft/lora.py
(`can_fuse`, `project`): this module never imports the modules it runs for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels import lora_casts, lora_decode, rebuild
from fasttune.kernels.dispatch import kernel_choice
from fasttune.kernels.fp8 import fp8_input_grad, fp8_linear, quantize_rows
from fasttune.kernels.gemv import gemv, one_row_linears


def fused_lora_enabled(x: torch.Tensor) -> bool:
    """FASTTUNE_KERNELS=torch selects the reference path; "triton" forces this one; by default it runs on CUDA."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    return choice == "triton" or x.is_cuda


def _base_weight(layer, dtype):
    base = layer.base_layer
    if getattr(type(base), "dequantized_weight", None) is not None:  # QuantLinear: a temporary 16-bit copy
        return base.dequantized_weight(dtype)
    return _as(base.weight, dtype)


def _fp8_base(layer):
    """The layer's base when it stores its weight in FP8 (a QuantLinear of quant_type "fp8"), else None."""
    base = layer.base_layer
    return base if getattr(base, "quant_type", None) == "fp8" else None


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # (this runs per layer per step: no call when already right)


def _dropout_p(layer) -> float:
    drop = layer.lora_dropout
    return drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


class _LoraGroupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers, values_unused, again, *params):
        """x (..., in); layers: the LoRA layers reading x; values_unused: skip the base GEMMs (see lora_group);
        again: (fn, sources) that rebuild x for backward in place of keeping it (kernels/rebuild.py), or None;
        params: (lora_A, lora_B) per layer. Returns one (..., out_i) tensor per layer in x's dtype."""
        dtype, shape = x.dtype, x.shape
        x2 = x.reshape(-1, shape[-1])
        ranks = [layer.r for layer in layers]
        scales = [layer.scaling for layer in layers]
        probs = [_dropout_p(layer) for layer in layers]
        casts = lora_casts.current()
        if casts is not None and not any(probs):  # a decode step: its kept 16-bit copies (kernels/lora_casts.py)
            a_all, bs = casts.factors(layers, params, dtype)
        else:  # one cast for the whole group's A (and one GEMM below when there is no dropout)
            a_all = (torch.cat(params[0::2]) if len(layers) > 1 else params[0]).to(dtype)
            bs = [_as(b, dtype) for b in params[1::2]]
        masks = [None] * len(layers)
        if any(probs):
            # One mask per layer, drawn in layer order as separate nn.Dropout modules would draw them.
            xas = []
            for i, (p, a) in enumerate(zip(probs, a_all.split(ranks))):
                xi = x2
                if p:
                    xi, masks[i] = torch.native_dropout(x2, p, True)
                xas.append(F.linear(xi, a))
            xa_all = torch.cat(xas, dim=1)
        else:
            xa_all = F.linear(x2, a_all)
        outs, x_fp8 = [], None
        for layer, xa, b, s in zip(layers, xa_all.split(ranks, dim=1), bs, scales):
            if values_unused:  # a recompute whose output only carries the graph: skip the GEMMs (see below)
                outs.append(x2.new_empty(*shape[:-1], b.shape[0]))
                continue
            bias, xs = layer.base_layer.bias, xa * s if s != 1 else xa
            fp8 = _fp8_base(layer)
            if fp8 is not None:  # the FP8 GEMM writes the output, the low-rank product is added onto it
                x_fp8 = x_fp8 or quantize_rows(x2)
                out = fp8_linear(*x_fp8, fp8.qweight, fp8.weight_scale, dtype).addmm_(xs, b.t())
                outs.append((out if bias is None else out.add_(_as(bias, dtype))).view(*shape[:-1], out.shape[-1]))
                continue
            # Low-rank product first, then the base GEMM accumulates onto it (beta=1): the K=r GEMM only writes the
            # output, where adding it afterwards read and wrote the whole (tokens x out) output once more (~90 us
            # of the 8B shape's gate/up, ~14% of their base GEMM).
            out = torch.mm(xs, b.t()) if bias is None else torch.addmm(_as(bias, dtype), xs, b.t())
            w = _base_weight(layer, dtype)
            out.addmm_(x2, w.t())
            del w  # a dequantised copy goes before the next layer's is made (two at once: +135 MB at 14B)
            outs.append(out.view(*shape[:-1], out.shape[-1]))
        ctx.layers, ctx.ranks, ctx.scales, ctx.probs, ctx.shape = layers, ranks, scales, probs, shape
        ctx.a_dtype, ctx.b_dtypes = params[0].dtype, [b.dtype for b in params[1::2]]
        ctx.rebuild = None if again is None else again[0]
        kept = (x2,) if again is None else again[1]  # the rebuild's sources, kept by other nodes anyway
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*kept, xa_all, a_all, *bs, *[m for m in masks if m is not None])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        """grads: one (..., out_i) per output -> (dx (..., in) or None, None, None, dA/dB per layer or None)."""
        saved = ctx.saved_tensors
        kept, (xa_all, a_all, *rest) = saved[:ctx.n_kept], saved[ctx.n_kept:]
        x2 = kept[0] if ctx.rebuild is None else rebuild.rebuilt(ctx.rebuild, kept)
        x2 = x2.reshape(-1, x2.shape[-1])
        n = len(ctx.layers)
        bs, saved_masks = rest[:n], iter(rest[n:])
        masks = [next(saved_masks) if p else None for p in ctx.probs]
        gs = [_as(g.reshape(-1, g.shape[-1]), x2.dtype) for g in grads]
        # Low-rank side first: (tokens x r) products.
        gbs = [_scaled(torch.mm(g, b), s) for g, b, s in zip(gs, bs, ctx.scales)]
        dropout = any(ctx.probs)
        gb_all = None if dropout else torch.cat(gbs, dim=1) if n > 1 else gbs[0]  # one GEMM each for dA and dx
        d_a = d_b = [None] * n
        if any(ctx.needs_input_grad[4:]):  # adapters that train (frozen ones skip these GEMMs)
            d_b = [_scaled(torch.mm(g.t(), xa), s).to(dt)
                   for g, xa, s, dt in zip(gs, xa_all.split(ctx.ranks, dim=1), ctx.scales, ctx.b_dtypes)]
            if dropout:
                d_a = [torch.mm(gb.t(), x2 if m is None else _undrop(x2, m, p)).to(ctx.a_dtype)
                       for gb, m, p in zip(gbs, masks, ctx.probs)]
            else:
                d_a = torch.mm(gb_all.t(), x2).to(ctx.a_dtype).split(ctx.ranks)
        dx = None
        if ctx.needs_input_grad[0]:
            # As in forward: the low-rank terms first (the K=r GEMM only writes), then every base GEMM accumulates.
            if dropout:
                for gb, a, m, p in zip(gbs, a_all.split(ctx.ranks), masks, ctx.probs):
                    term = gb @ a if m is None else _undrop(gb @ a, m, p)
                    dx = term if dx is None else dx.add_(term)
            else:
                dx = torch.mm(gb_all, a_all)
            for layer, g in zip(ctx.layers, gs):
                fp8 = _fp8_base(layer)
                if fp8 is not None:
                    dx.add_(fp8_input_grad(g, fp8.qweight, fp8.weight_scale))
                    continue
                w = _base_weight(layer, x2.dtype)
                dx.addmm_(g, w)
                del w  # as in forward: one dequantised copy at a time
            dx = dx.view(ctx.shape)
        param_grads = [t for pair in zip(d_a, d_b) for t in pair]
        grads = [g if need else None for g, need in zip(param_grads, ctx.needs_input_grad[4:])]
        return (dx, None, None, None, *grads)


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t if s == 1 else t.mul_(s)


def _undrop(t: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """t passed through the dropout whose mask is `mask` (dropout's backward, and the dropped input again)."""
    return torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - p))


def lora_group(x: torch.Tensor, layers, values_unused: bool = False) -> tuple:
    """Outputs of the LoRA layers `layers` (all enabled, each reading x), through the fused path.

    values_unused=True: the caller needs the outputs only as graph nodes, never their values; their backward
    needs only x and the low-rank products, so the base GEMMs are skipped and the outputs left uninitialised.
    Per-layer recompute uses this for a layer's last projection (down_proj), whose output only feeds the residual
    add in backward: about a quarter of a recomputed layer's GEMM work.
    """
    params = [t for layer in layers for t in (layer.lora_A, layer.lora_B)]
    casts = lora_casts.current()
    if casts is not None and not values_unused and not any(_dropout_p(layer) for layer in layers):
        outs = _decode_group(x, layers, params, casts)
        if outs is not None:
            return outs
    again = rebuild.rebuild_of(x) if torch.is_grad_enabled() else None
    return _LoraGroupFunction.apply(x, list(layers), values_unused, again, *params)


def _decode_group(x: torch.Tensor, layers, params, casts) -> tuple | None:
    """The group's outputs in a decode step (no gradients): the low-rank terms in kernels/lora_decode.py's two
    launches, then the base GEMMs onto them (FP8 bases, and one row over 16-bit bases through kernels/gemv.py's one
    launch: the base products first, the terms added onto them). None where those kernels do not take the shape (the
    caller's path runs)."""
    dtype, shape = x.dtype, x.shape
    x2 = x.reshape(-1, shape[-1])
    a_all, bs = casts.factors(layers, params, dtype)
    fp8 = [_fp8_base(layer) for layer in layers]
    biases = [layer.base_layer.bias for layer in layers]
    if not lora_decode.fits(x2, bs) or len({f is None for f in fp8}) > 1 or len({b is None for b in biases}) > 1:
        return None
    scales = [layer.scaling for layer in layers]
    bases = [layer.base_layer for layer in layers]
    if one_row_linears(x2, bases):  # batch 1 over 16-bit weights: the group's base products in one GEMV launch
        outs = list(gemv(x2, [b.weight for b in bases], [b.bias for b in bases]))
        lora_decode.lora_delta(x2, a_all, bs, scales, outs, accumulate=True)
    elif fp8[0] is not None:
        x_fp8 = quantize_rows(x2)
        outs = [fp8_linear(*x_fp8, f.qweight, f.weight_scale, dtype) for f in fp8]
        lora_decode.lora_delta(x2, a_all, bs, scales, outs, accumulate=True)
        if biases[0] is not None:
            for out, bias in zip(outs, biases):
                out.add_(_as(bias, dtype))
    else:
        outs = [x2.new_empty(x2.shape[0], b.shape[0]) for b in bs]
        lora_decode.lora_delta(x2, a_all, bs, scales, outs,
                               biases=None if biases[0] is None else [_as(b, dtype) for b in biases])
        for layer, out in zip(layers, outs):
            w = _base_weight(layer, dtype)
            out.addmm_(x2, w.t())
            del w  # one dequantised copy at a time
    return tuple(out.view(*shape[:-1], out.shape[-1]) for out in outs)
