"""The sequential part of the chunked gated delta rule (models/delta_rule.py): the scan over chunks that carries
the (d_k x d_v) state, forward and backward each as one Triton program per (row x value head, d_v block).

Per chunk i, with W_i, K_i (C x d_k), U_i (C x d_v) and the chunk's total decay gamma_i:
    S_i = state;   V_i = U_i - W_i S_i;   state <- gamma_i S_i + K_i^T V_i
returning every chunk's starting state S_i, the corrected values V_i and the final state. In torch this is a loop
of small matmuls (about seven launches per chunk, more in backward): at Qwen3.5-9B's shape it was most of a training
step. The kernels keep the state in registers across the chunks, in fp32 with IEEE products (no TF32), so they give
the torch loop's values.

Backward, with g the gradient of the state after chunk i (starting from the final state's):
    dV_i = dV_i' + K_i g;   dS_i = dS_i' + gamma_i g - W_i^T dV_i;   then g <- dS_i
(primes: the gradients arriving from the later torch ops); the kernel writes dV_i and each g, and the gradients of
U, W, K and gamma follow from them in batched torch matmuls: dU = dV, dW_i = -dV_i S_i^T, dK_i = V_i g_i^T,
dgamma_i = sum(S_i * g_i).
"""
from __future__ import annotations

import os

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


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


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tiles(C, DK, DV, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """Offsets and masks of this program's (C x DK), (C x DV block) and (DK x DV block) tiles."""
        rc, rk = tl.arange(0, BC), tl.arange(0, BK)
        rv = tl.program_id(1) * BV + tl.arange(0, BV)
        mc, mk, mv = rc < C, rk < DK, rv < DV
        ck = rc[:, None] * DK + rk[None, :]
        cv = rc[:, None] * DV + rv[None, :]
        kv = rk[:, None] * DV + rv[None, :]
        return ck, cv, kv, mc[:, None] & mk[None, :], mc[:, None] & mv[None, :], mk[:, None] & mv[None, :]

    @triton.jit
    def _scan_fwd(w_ptr, u_ptr, k_ptr, gamma_ptr, s0_ptr, states_ptr, v_ptr, final_ptr, n, C, DK, DV,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
        """One (row x head, d_v block): the state (BK x BV) through the n chunks (layouts in chunk_scan)."""
        bh = tl.program_id(0).to(tl.int64)
        ck, cv, kv, m_ck, m_cv, m_kv = _tiles(C, DK, DV, BC, BK, BV)
        s = tl.load(s0_ptr + bh * DK * DV + kv, mask=m_kv, other=0.0)
        for i in range(n):
            chunk = bh * n + i
            tl.store(states_ptr + chunk * DK * DV + kv, s, mask=m_kv)
            w = tl.load(w_ptr + chunk * C * DK + ck, mask=m_ck, other=0.0)
            v = tl.load(u_ptr + chunk * C * DV + cv, mask=m_cv, other=0.0) - tl.dot(w, s, input_precision=PRECISION)
            tl.store(v_ptr + chunk * C * DV + cv, v, mask=m_cv)
            k = tl.load(k_ptr + chunk * C * DK + ck, mask=m_ck, other=0.0)
            s = s * tl.load(gamma_ptr + chunk) + tl.dot(tl.trans(k), v, input_precision=PRECISION)
        tl.store(final_ptr + bh * DK * DV + kv, s, mask=m_kv)

    @triton.jit
    def _scan_bwd(w_ptr, k_ptr, gamma_ptr, dstates_ptr, dv_ptr, dfinal_ptr, g_ptr, ds0_ptr, n, C, DK, DV,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
        """The reverse scan: dv (in: the later ops' dV; out: the total), g (out: the gradient of each chunk's
        end state), ds0 (out: the initial state's)."""
        bh = tl.program_id(0).to(tl.int64)
        ck, cv, kv, m_ck, m_cv, m_kv = _tiles(C, DK, DV, BC, BK, BV)
        g = tl.load(dfinal_ptr + bh * DK * DV + kv, mask=m_kv, other=0.0)
        for j in range(n):
            chunk = bh * n + (n - 1 - j)
            tl.store(g_ptr + chunk * DK * DV + kv, g, mask=m_kv)
            k = tl.load(k_ptr + chunk * C * DK + ck, mask=m_ck, other=0.0)
            dv = tl.load(dv_ptr + chunk * C * DV + cv, mask=m_cv, other=0.0) + tl.dot(k, g, input_precision=PRECISION)
            tl.store(dv_ptr + chunk * C * DV + cv, dv, mask=m_cv)
            w = tl.load(w_ptr + chunk * C * DK + ck, mask=m_ck, other=0.0)
            g = tl.load(dstates_ptr + chunk * DK * DV + kv, mask=m_kv, other=0.0) + g * tl.load(gamma_ptr + chunk) \
                - tl.dot(tl.trans(w), dv, input_precision=PRECISION)
        tl.store(ds0_ptr + bh * DK * DV + kv, g, mask=m_kv)


def _precision() -> str:
    """The kernels' matmul precision: "ieee" (fp32 products) or "tf32" (FASTTUNE_DELTA_SCAN=tf32: tensor cores,
    10-bit mantissas; not in the interpreter)."""
    return "tf32" if os.environ.get("FASTTUNE_DELTA_SCAN") == "tf32" else "ieee"


def _blocks(c: int, dk: int, dv: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16; d_v is split so that more programs run (and fewer registers each)
    return max(16, next_pow2(c)), max(16, next_pow2(dk)), max(16, min(32, next_pow2(dv)))


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, gamma, s0):
        b, h, n, c, dk = w.shape
        dv = u.shape[-1]
        w, u, k, gamma, s0 = (x.contiguous() for x in (w, u, k, gamma, s0))
        states = w.new_empty(b, h, n, dk, dv)
        v = torch.empty_like(u)
        final = torch.empty_like(s0)
        bc, bk, bv = _blocks(c, dk, dv)
        _scan_fwd[(b * h, triton.cdiv(dv, bv))](w, u, k, gamma, s0, states, v, final, n, c, dk, dv,
                                                 BC=bc, BK=bk, BV=bv, PRECISION=_precision(), num_warps=8)
        ctx.save_for_backward(w, k, gamma, states, v)
        return states, v, final

    @staticmethod
    def backward(ctx, d_states, d_v, d_final):
        w, k, gamma, states, v = ctx.saved_tensors
        b, h, n, c, dk = w.shape
        dv = v.shape[-1]
        # (autograd hands zeros for an output nobody used)
        d_states, d_final = d_states.contiguous(), d_final.contiguous()
        d_total = d_v.contiguous().clone()  # the kernel adds into it
        g = torch.empty_like(states)
        d_s0 = torch.empty_like(d_final)
        bc, bk, bv = _blocks(c, dk, dv)
        _scan_bwd[(b * h, triton.cdiv(dv, bv))](w, k, gamma, d_states, d_total, d_final, g, d_s0, n, c, dk, dv,
                                                 BC=bc, BK=bk, BV=bv, PRECISION=_precision(), num_warps=8)
        d_w = -(d_total @ states.transpose(-1, -2))
        d_k = v @ g.transpose(-1, -2)
        d_gamma = (states * g).sum((-1, -2))
        return d_w, d_total, d_k, d_gamma, d_s0


class _ChunkScanTorch(torch.autograd.Function):
    """The scan in torch with the backward written out (the kernels' recurrences, one fused multiply-add matmul per
    step): autograd through chunk_scan_reference's loop differentiates each chunk's slice of the stacked inputs
    into a zero tensor of the whole stack, which made its backward four times its forward on the GPU."""

    @staticmethod
    def forward(ctx, w, u, k, gamma, s0, keep):
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
    """chunk_scan_reference's scan (same arguments and returns, fp32): in torch with a written-out backward
    (_ChunkScanTorch), or by the Triton kernels with FASTTUNE_DELTA_SCAN=triton (or tf32) where Triton runs
    (kernels/dispatch.py) and no `keep` is given. On an H200 at Qwen3.5-9B's shape the torch form is the faster:
    the kernels' fp32 state tiles spill (8.7 ms forward per layer against cuBLAS's ~3 ms)."""
    if keep is None and os.environ.get("FASTTUNE_DELTA_SCAN") in ("triton", "tf32") and use_triton(w):
        return _ChunkScan.apply(w, u, k, gamma, s0)
    return _ChunkScanTorch.apply(w, u, k, gamma, s0, keep)
