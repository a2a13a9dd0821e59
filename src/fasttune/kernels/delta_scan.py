"""The sequential part of the chunked gated delta rule (models/delta_rule.py): the scan over chunks that carries
the (d_k x d_v) state, with its backward written out.

Per chunk i, with W_i, K_i (C x d_k), U_i (C x d_v) and the chunk's total decay gamma_i:
    S_i = state (times keep_i: 0 where a packed run starts);   V_i = U_i - W_i S_i;   state <- gamma_i S_i + K_i^T V_i
returning every chunk's starting state S_i, the corrected values V_i and the final state.

Backward, with g the gradient of the state after chunk i (starting from the final state's):
    dV_i = dV_i' + K_i g;   dS_i = dS_i' + gamma_i g - W_i^T dV_i;   then g <- keep_i dS_i
(primes: the gradients arriving from the later torch ops); the gradients of U, W, K and gamma follow in batched
matmuls: dU = dV, dW_i = -dV_i S_i^T, dK_i = V_i g_i^T, dgamma_i = sum(S_i * g_i).

Why not autograd through the loop (chunk_scan_reference): it differentiates each chunk's slice of the stacked inputs
into a zero tensor of the whole stack, which made the backward four times the forward on the GPU (6.3x slower than
this on the CPU). Triton kernels for this scan (fp32 state in registers; commit 79566be) were slower than the torch
loop on an H200 at Qwen3.5-9B's shape (11.4 ms forward per layer against 4.0: the state tiles spill) and were
removed.
"""
from __future__ import annotations

import torch


def chunk_scan_reference(w, u, k, gamma, s0, keep=None):
    """The scan in torch ops (autograd differentiates it). w, k (B, H, n, C, d_k); u (B, H, n, C, d_v); gamma
    (B, H, n); s0 (B, H, d_k, d_v); all fp32; keep: None or (B, n) 0/1, the state multiplied by it as chunk i
    starts (0: a new sequence begins there, packed documents). Returns (states (B, H, n, d_k, d_v), v
    (B, H, n, C, d_v), final state (B, H, d_k, d_v))."""
    state, states, values = s0, [], []
    for i in range(w.shape[2]):
        if keep is not None:
            state = state * keep[:, i, None, None, None]
        states.append(state)
        v = u[:, :, i] - w[:, :, i] @ state
        values.append(v)
        state = state * gamma[:, :, i, None, None] + k[:, :, i].transpose(-1, -2) @ v
    return torch.stack(states, dim=2), torch.stack(values, dim=2), state


class _ChunkScan(torch.autograd.Function):
    """The scan with its backward written out (the recurrences in the module docstring, one fused multiply-add
    matmul per chunk and direction)."""

    @staticmethod
    def forward(ctx, w, u, k, gamma, s0, keep):
        """chunk_scan's arguments -> (states, v, final state); saves w, k, gamma, the states, v and keep."""
        b, h, n, c, dk = w.shape
        dv = u.shape[-1]
        w, u, k = (x.reshape(b * h, n, c, x.shape[-1]) for x in (w, u, k))
        gamma = gamma.reshape(b * h, n)
        keep = None if keep is None else keep[:, None].expand(b, h, n).reshape(b * h, n)
        states = w.new_empty(b * h, n, dk, dv)
        v = torch.empty_like(u)
        state = s0.reshape(b * h, dk, dv)
        for i in range(n):
            if keep is not None:
                state = state * keep[:, i, None, None]
            states[:, i] = state
            v[:, i] = torch.baddbmm(u[:, i], w[:, i], state, alpha=-1)
            state = torch.baddbmm(state * gamma[:, i, None, None], k[:, i].transpose(1, 2), v[:, i])
        ctx.save_for_backward(w, k, gamma, states, v, keep)
        ctx.shape = (b, h)
        return states.view(b, h, n, dk, dv), v.view(b, h, n, c, dv), state.view(b, h, dk, dv)

    @staticmethod
    def backward(ctx, d_states, d_v, d_final):
        """Gradients of the three outputs (autograd hands zeros for an unused one) -> (d w, d u, d k, d gamma,
        d s0, None)."""
        w, k, gamma, states, v, keep = ctx.saved_tensors
        b, h = ctx.shape
        bh, n, c, dk = w.shape
        dv = v.shape[-1]
        d_states = d_states.reshape(bh, n, dk, dv)
        d_total = d_v.reshape(bh, n, c, dv).clone()
        g = d_final.reshape(bh, dk, dv)
        ends = torch.empty_like(states)  # the gradient of each chunk's end state
        for i in reversed(range(n)):
            ends[:, i] = g
            d_total[:, i] = torch.baddbmm(d_total[:, i], k[:, i], g)
            g = torch.baddbmm(d_states[:, i] + gamma[:, i, None, None] * g, w[:, i].transpose(1, 2), d_total[:, i],
                              alpha=-1)
            if keep is not None:
                g = g * keep[:, i, None, None]
        d_w = -(d_total @ states.transpose(-1, -2))
        d_k = v @ ends.transpose(-1, -2)
        d_gamma = (states * ends).sum((-1, -2))
        shape = lambda x: x.view(b, h, *x.shape[1:])  # noqa: E731
        return shape(d_w), shape(d_total), shape(d_k), shape(d_gamma), shape(g), None


def chunk_scan(w, u, k, gamma, s0, keep=None):
    """chunk_scan_reference's scan (same arguments and returns, fp32) with the backward written out."""
    return _ChunkScan.apply(w, u, k, gamma, s0, keep)
