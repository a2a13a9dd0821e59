"""The chunked gated delta rule (models/delta_rule.py) as one autograd function with its backward written out: the
work inside each chunk in batched torch products, the state carried between chunks by kernels/delta_scan.py.

Per (row, value head, chunk), fp32, with q (scaled), k (C x d_k), v (C x d_v), beta and the log-decays g (C), and
G = cumsum(g) within the chunk (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", 2024, the WY form):
    D[s, r] = exp(G_s - G_r) for r <= s, else 0;   A = strictly-lower((beta k) k^T * D);   M = (I + A)^-1
    U = M (beta v);   W = M (beta k exp(G));   scores = (q k^T) * D
    (states S_i, corrected values V) = scan(W, U, k exp(G_C - G), exp(G_C))       (kernels/delta_scan.py)
    o = (q exp(G)) S_i + scores V

Backward, the chain rule through those lines in reverse (dX: the gradient of X):
    dS_i = (q exp(G))^T do;  dV = scores^T do;  d scores = do V^T;
    then the scan's backward gives dW, dU, d(k e), d gamma
    dq = (do S_i^T) exp(G) + (d scores * D) k;   dk gets (d scores * D)^T q
    dM = dU (beta v)^T + dW (beta k exp(G))^T;   d(beta v) = M^T dU;   d(beta k exp(G)) = M^T dW
    dA = -(M^T dM M^T), strictly lower;   d(beta k) += (dA * D) k;   dk += (dA * D)^T (beta k)
    dG_s gets sum_r X[s, r] - sum_r X[r, s] for X = d scores * scores and X = dA * A (through D), plus the terms of
    exp(G) in q, W and the scan's inputs; dg = the reverse cumulative sum of dG.

Two forms run the work inside the chunks: the batched torch products here (the reference) and Triton kernels that
fuse each chunk's steps (kernels/delta_chunk_triton.py; FASTTUNE_DELTA_CHUNK=torch|triton, chunk_config there).

Why not autograd: it kept a dozen fp32 (chunk x 128) and (chunk x chunk) intermediates per layer and ran each
product of the series inverse backwards; this saves q, k, v, beta, G, M, W and the scan's states and values, and
recomputes the cheap elementwise terms.
"""
from __future__ import annotations

import contextlib

import torch

from fasttune.kernels.delta_chunk_triton import (chunk_backward, chunk_config, chunk_output, chunk_prepare,
                                                 chunk_scan_grads)
from fasttune.kernels.delta_scan import chunk_scan_reference, scan_backward, scan_forward
from fasttune.kernels.tf32 import tf32_products


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + a)^-1 for strictly lower-triangular a (..., C, C), C a power of two, as the product
    (I - a)(I + a^2)(I + a^4)...(I + a^(C/2)): a is nilpotent (a^C = 0), so this is the whole series sum (-a)^j.
    Batched matmuls only: on the GPU much faster than a batched triangular solve, and as accurate here (|a| <= 1).
    (Differentiable by autograd; _ChunkedRule's backward uses the inverse's own, -M^T dM M^T.)"""
    c = a.shape[-1]
    flat = a.reshape(-1, c, c)
    inverse = torch.eye(c, dtype=a.dtype, device=a.device) - flat
    power = flat @ flat
    for _ in range(c.bit_length() - 2):  # powers a^2 ... a^(C/2)
        inverse = torch.baddbmm(inverse, inverse, power)  # inverse (I + power), one kernel
        power = power @ power
    return inverse.view(a.shape)


def _precision(tf32: bool):
    """TF32 products inside the block where `tf32` (kernels/tf32.py), else torch's setting as it is."""
    return tf32_products() if tf32 else contextlib.nullcontext()


def _decay(cum: torch.Tensor) -> torch.Tensor:
    """D (..., C, C): exp(G_s - G_r) for r <= s, else 0, from G (..., C)."""
    c = cum.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=cum.device).tril()
    return (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _within_chunks(k, v, beta, g):
    """The module docstring's first two lines: (G, D, M, exp(G)[..., None], U, W, exp(G_C - G)[..., None])."""
    cum = g.cumsum(-1)
    decay = _decay(cum)
    kb = k * beta[..., None]
    inverse = unit_lower_inverse((kb @ _t(k) * decay).tril(-1))
    grow = cum.exp()[..., None]
    u = inverse @ (v * beta[..., None])
    w = inverse @ (kb * grow)
    return cum, decay, inverse, grow, u, w, (cum[..., -1:] - cum).exp()[..., None]


def _output(q, k, grow, decay, states, values):
    """o = (q exp(G)) S_i + ((q k^T) * D) V."""
    return (q * grow) @ states + (q @ _t(k) * decay) @ values


class _ChunkedRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, keep, config, tf32, fused):
        """See chunked_rule; fused: the within-chunk kernels' ChunkConfig, or None for the torch ops. Saves q, k, v,
        beta, G, M, W, the states and the corrected values."""
        ctx.config, ctx.tf32, ctx.fused = config, tf32, fused
        if fused is not None:
            cum, inverse, u, w, k_to_end, gamma = chunk_prepare(k, v, beta, g, fused)
            states, values, final = scan_forward(w, u, k_to_end, gamma, s0, keep, config)
            ctx.save_for_backward(q, k, v, beta, cum, inverse, w, states, values, keep)
            return chunk_output(q, k, cum, states, values, fused), final
        with _precision(tf32):
            cum, decay, inverse, grow, u, w, to_end = _within_chunks(k, v, beta, g)
            states, values, final = scan_forward(w, u, k * to_end, cum[..., -1].exp(), s0, keep, config)
            o = _output(q, k, grow, decay, states, values)
        ctx.save_for_backward(q, k, v, beta, cum, inverse, w, states, values, keep)
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        """(do, d final state) -> (dq, dk, dv, d beta, dg, d s0, None x 4): the module docstring's lines."""
        q, k, v, beta, cum, inverse, w, states, values, keep = ctx.saved_tensors
        if ctx.fused is not None:  # the kernels before and after the scan's backward
            d_o = d_o.contiguous()  # (once: both kernels read it)
            k_to_end, gamma, d_states, d_values = chunk_scan_grads(q, k, cum, d_o, ctx.fused)
            d_w, d_u, d_ke, d_gamma, d_s0 = scan_backward(w, k_to_end, gamma, states, values, keep, ctx.config,
                                                          d_states, d_values, d_final)
            grads = chunk_backward(q, k, v, beta, cum, inverse, states, values, d_o, d_w, d_u, d_ke, d_gamma,
                                   ctx.fused)
            return (*grads, d_s0, None, None, None, None)
        with _precision(ctx.tf32):
            decay = _decay(cum)
            grow = cum.exp()[..., None]
            to_end = (cum[..., -1:] - cum).exp()[..., None]
            gamma = cum[..., -1].exp()
            kb, vb = k * beta[..., None], v * beta[..., None]
            q_grown = q * grow
            scores = q @ _t(k) * decay
            # o = (q exp(G)) S + scores V
            d_q_grown = d_o @ _t(states)
            d_scores = d_o @ _t(values)
            d_w, d_u, d_ke, d_gamma, d_s0 = scan_backward(w, k * to_end, gamma, states, values, keep, ctx.config,
                                                          _t(q_grown) @ d_o, _t(scores) @ d_o, d_final)
            masked = d_scores * decay
            dq = d_q_grown * grow + masked @ k
            dk = _t(masked) @ q
            through_decay = d_scores * scores
            d_cum = through_decay.sum(-1) - through_decay.sum(-2) + (d_q_grown * q_grown).sum(-1)
            # U = M (beta v), W = M (beta k exp(G))
            kb_grown = kb * grow
            mt = _t(inverse)
            d_vb, d_kb_grown = mt @ d_u, mt @ d_w
            d_inverse = d_u @ _t(vb) + d_w @ _t(kb_grown)
            dv = d_vb * beta[..., None]
            d_beta = (d_vb * v).sum(-1)
            d_cum = d_cum + (d_kb_grown * kb_grown).sum(-1)
            # M = (I + A)^-1, A = strictly-lower((beta k) k^T * D)
            d_a = (-(mt @ d_inverse @ mt)).tril(-1) * decay
            d_kb = d_kb_grown * grow + d_a @ k
            dk = dk + _t(d_a) @ kb
            through_decay = d_a * (kb @ _t(k))
            d_cum = d_cum + through_decay.sum(-1) - through_decay.sum(-2)
            dk = dk + d_kb * beta[..., None] + d_ke * to_end
            d_beta = d_beta + (d_kb * k).sum(-1)
            # the scan's inputs k exp(G_C - G) and gamma = exp(G_C)
            ke_term = (d_ke * k * to_end).sum(-1)
            d_cum = d_cum - ke_term
            d_cum[..., -1] += ke_term.sum(-1) + d_gamma * gamma
            dg = d_cum.flip(-1).cumsum(-1).flip(-1)
        return dq, dk, dv, d_beta, dg, d_s0, None, None, None, None


def chunked_rule(q, k, v, beta, g, s0, keep=None, config=None, tf32: bool = False):
    """The chunked gated delta rule on prepared chunks: q (scaled), k (B, H, n, C, d_k), v (B, H, n, C, d_v), beta
    and g (B, H, n, C), s0 (B, H, d_k, d_v), all fp32 (one value head per head: key heads already repeated);
    keep (B, n) 0/1 or None (kernels/delta_scan.py); config: the scan's ScanConfig (Triton) or None (torch loop);
    tf32: products on TF32 tensor cores (CUDA, 16-bit callers). The work inside the chunks runs in the Triton
    kernels of kernels/delta_chunk_triton.py where its chunk_config allows (with the Triton scan only), else in
    torch ops. Returns (o (B, H, n, C, d_v), final state (B, H, d_k, d_v)), both differentiable."""
    return _ChunkedRule.apply(q, k, v, beta, g, s0, keep, config, tf32, chunk_config(k, v, config, tf32))


def chunked_rule_reference(q, k, v, beta, g, s0, keep=None):
    """chunked_rule in plain torch ops, the scan a loop (chunk_scan_reference): autograd differentiates it. Same
    arguments (fp32 IEEE products) and returns."""
    cum, decay, inverse, grow, u, w, to_end = _within_chunks(k, v, beta, g)
    states, values, final = chunk_scan_reference(w, u, k * to_end, cum[..., -1].exp(), s0, keep)
    return _output(q, k, grow, decay, states, values), final
