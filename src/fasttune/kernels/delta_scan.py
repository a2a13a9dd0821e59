"""The sequential part of the chunked gated delta rule (models/delta_rule.py): the scan over chunks that carries
the (d_k x d_v) state, with its backward written out.

Per chunk i, with W_i, K_i (C x d_k), U_i (C x d_v) and the chunk's total decay gamma_i:
    S_i = state (times keep_i: 0 where a packed run starts);   V_i = U_i - W_i S_i;   state <- gamma_i S_i + K_i^T V_i
returning every chunk's starting state S_i, the corrected values V_i and the final state.

Backward, with g the gradient of the state after chunk i (starting from the final state's):
    dV_i = dV_i' + K_i g;   dS_i = dS_i' + gamma_i g - W_i^T dV_i;   then g <- keep_i dS_i
(primes: the gradients arriving from the later torch ops); the gradients of U, W, K and gamma follow in batched
matmuls: dU = dV, dW_i = -dV_i S_i^T, dK_i = V_i g_i^T, dgamma_i = sum(S_i * g_i).
Without W (Mamba-2's scan between chunks, models/ssd.py) V_i = U_i: no correction product either way.

Two forms run it: Triton kernels (_scan_fwd, _scan_bwd: one program per (row x head, d_v block) keeps its fp32 state
block in registers through every chunk, one launch each way) and a torch loop (a few launches per chunk). Why not
autograd through the loop (chunk_scan_reference): it differentiates each chunk's slice of the stacked inputs into a
zero tensor of the whole stack, which made the backward four times the forward on the GPU (6.3x slower than the
written-out backward on the CPU). An earlier Triton version held whole 128 x 128 states with IEEE products and
spilled (11.4 ms forward per layer on an H200); d_v blocks of 64 with TF32 products take 0.2 ms.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch

from fasttune.errors import ConfigError
from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton
from fasttune.kernels.tf32 import tf32_products


def chunk_scan_reference(w, u, k, gamma, s0, keep=None):
    """The scan in torch ops (autograd differentiates it). w, k (B, H, n, C, d_k); u (B, H, n, C, d_v); gamma
    (B, H, n); s0 (B, H, d_k, d_v); all fp32; w None: no correction term (V_i = U_i: Mamba-2's scan, models/ssd.py);
    keep: None or (B, n) 0/1, the state multiplied by it as chunk i starts (0: a new sequence begins there, packed
    documents). Returns (states (B, H, n, d_k, d_v), v (B, H, n, C, d_v), final state (B, H, d_k, d_v))."""
    state, states, values = s0, [], []
    for i in range(k.shape[2]):
        if keep is not None:
            state = state * keep[:, i, None, None, None]
        states.append(state)
        v = u[:, :, i] if w is None else u[:, :, i] - w[:, :, i] @ state
        values.append(v)
        state = state * gamma[:, :, i, None, None] + k[:, :, i].transpose(-1, -2) @ v
    return torch.stack(states, dim=2), torch.stack(values, dim=2), state


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tiles(C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, GROUP: tl.constexpr):
        """This program's row x head, the offsets of its (C x DK), (C x BV) and (DK x BV) tiles (the last in the
        per-head layout of s0 / final, and within a chunk's block of the states' layout, where GROUP heads' columns
        sit side by side), the mask of its columns below DV (the last block of a d_v that is no power of two is
        partly outside), and its row x group (GROUP consecutive heads share keys and a block of states)."""
        rc, rk = tl.arange(0, C), tl.arange(0, DK)
        rv = tl.program_id(1) * BV + tl.arange(0, BV)
        bh = tl.program_id(0).to(tl.int64)
        return (bh, rc[:, None] * DK + rk[None, :], rc[:, None] * DV + rv[None, :], rk[:, None] * DV + rv[None, :],
                rk[:, None] * DV * GROUP + (bh % GROUP) * DV + rv[None, :], (rv < DV)[None, :], bh // GROUP)

    @triton.jit
    def _scan_fwd(w_ptr, u_ptr, k_ptr, gamma_ptr, keep_ptr, s0_ptr, states_ptr, v_ptr, final_ptr, n, H,
                  C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, HAS_KEEP: tl.constexpr,
                  HAS_W: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr):
        """One (row x head, d_v block): the state (DK x BV, fp32) kept in registers through the n chunks."""
        bh, ck, cv, kv, kvs, cols, kh = _tiles(C, DK, DV, BV, GROUP)
        s = tl.load(s0_ptr + bh * DK * DV + kv, mask=cols, other=0.0)
        for i in tl.range(0, n, num_stages=STAGES):
            chunk = bh * n + i
            if HAS_KEEP:
                s = s * tl.load(keep_ptr + (bh // H) * n + i)
            tl.store(states_ptr + (kh * n + i) * DK * DV * GROUP + kvs, s, mask=cols)
            v = tl.load(u_ptr + chunk * C * DV + cv, mask=cols, other=0.0)
            if HAS_W:
                w = tl.load(w_ptr + chunk * C * DK + ck)
                v = v - tl.dot(w, s, input_precision=PRECISION)
                tl.store(v_ptr + chunk * C * DV + cv, v, mask=cols)
            k = tl.load(k_ptr + (kh * n + i) * C * DK + ck)
            s = s * tl.load(gamma_ptr + chunk) + tl.dot(tl.trans(k), v, input_precision=PRECISION)
        tl.store(final_ptr + bh * DK * DV + kv, s, mask=cols)

    @triton.jit
    def _scan_bwd(w_ptr, k_ptr, gamma_ptr, keep_ptr, dstates_ptr, dv_ptr, dfinal_ptr, ends_ptr, ds0_ptr, n, H,
                  C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, HAS_KEEP: tl.constexpr,
                  HAS_W: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr):
        """The reverse scan: dv (in: the later ops' dV; out: the total), ends (out: the gradient of each chunk's
        end state, in the states' layout, as dstates), ds0 (out: the initial state's)."""
        bh, ck, cv, kv, kvs, cols, kh = _tiles(C, DK, DV, BV, GROUP)
        g = tl.load(dfinal_ptr + bh * DK * DV + kv, mask=cols, other=0.0)
        for j in tl.range(0, n, num_stages=STAGES):
            i = n - 1 - j
            chunk = bh * n + i
            at = (kh * n + i) * DK * DV * GROUP + kvs
            tl.store(ends_ptr + at, g, mask=cols)
            k = tl.load(k_ptr + (kh * n + i) * C * DK + ck)
            dv = tl.load(dv_ptr + chunk * C * DV + cv, mask=cols, other=0.0) + tl.dot(k, g, input_precision=PRECISION)
            tl.store(dv_ptr + chunk * C * DV + cv, dv, mask=cols)
            g = tl.load(dstates_ptr + at, mask=cols, other=0.0) + g * tl.load(gamma_ptr + chunk)
            if HAS_W:
                w = tl.load(w_ptr + chunk * C * DK + ck)
                g = g - tl.dot(tl.trans(w), dv, input_precision=PRECISION)
            if HAS_KEEP:
                g = g * tl.load(keep_ptr + (bh // H) * n + i)
        tl.store(ds0_ptr + bh * DK * DV + kv, g, mask=cols)


def _grouped(per_head: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, n, a, d) per head -> (B, H / group, n, a, group * d): each group's heads side by side in the last dim
    (the states' layout with keys shared by `group` heads; the same tensor when group is 1)."""
    b, h, n, a, d = per_head.shape
    if group == 1:
        return per_head
    return per_head.view(b, h // group, group, n, a, d).permute(0, 1, 3, 4, 2, 5).reshape(b, h // group, n, a,
                                                                                          group * d)


def _per_head(grouped: torch.Tensor, group: int) -> torch.Tensor:
    """_grouped's inverse: (B, G, n, a, group * d) -> (B, G * group, n, a, d)."""
    b, g, n, a, gd = grouped.shape
    if group == 1:
        return grouped
    return grouped.view(b, g, n, a, group, gd // group).permute(0, 1, 4, 2, 3, 5).reshape(b, g * group, n, a,
                                                                                          gd // group)


def scan_forward(w, u, k, gamma, s0, keep, config):
    """The scan's forward (chunk_scan's arguments; config: a ScanConfig for the Triton kernels, None for the torch
    loop) -> (states (B, H / group, n, d_k, group * d_v), v, final state), nothing recorded for autograd. Without w,
    v is u itself."""
    b, h, n, c, dv = u.shape
    dk, group = k.shape[-1], h // k.shape[1]
    if config is not None:
        u, k, gamma, s0 = (x.contiguous() for x in (u, k, gamma, s0))
        w = None if w is None else w.contiguous()
        keep = None if keep is None else keep.float().contiguous()
        states = k.new_empty(b, h // group, n, dk, group * dv)
        v = u if w is None else torch.empty_like(u)
        final = torch.empty_like(s0)
        _scan_fwd[(b * h, -(-dv // config.bv))](w, u, k, gamma, keep, s0, states, v, final, n, h, C=c, DK=dk, DV=dv,
                                             BV=config.bv, HAS_KEEP=keep is not None, HAS_W=w is not None,
                                             PRECISION=config.precision, STAGES=config.stages, GROUP=group,
                                             num_warps=config.warps)
        return states, v, final
    u = u.reshape(b * h, n, c, dv)
    k = k[:, :, None].expand(b, h // group, group, n, c, dk).reshape(b * h, n, c, dk)  # (each head's keys)
    w = None if w is None else w.reshape(b * h, n, c, dk)
    gamma = gamma.reshape(b * h, n)
    keep = None if keep is None else keep[:, None].expand(b, h, n).reshape(b * h, n)
    states = k.new_empty(b * h, n, dk, dv)
    v = u if w is None else torch.empty_like(u)
    state = s0.reshape(b * h, dk, dv)
    for i in range(n):
        if keep is not None:
            state = state * keep[:, i, None, None]
        states[:, i] = state
        if w is not None:
            v[:, i] = torch.baddbmm(u[:, i], w[:, i], state, alpha=-1)
        state = torch.baddbmm(state * gamma[:, i, None, None], k[:, i].transpose(1, 2), v[:, i])
    return _grouped(states.view(b, h, n, dk, dv), group), v.view(b, h, n, c, dv), state.view(b, h, dk, dv)


def scan_backward(w, k, gamma, states, v, keep, config, d_states, d_v, d_final):
    """The scan's backward (the recurrences in the module docstring): the forward's w, k, gamma, keep and its
    states (its grouped layout) and v, and the gradients of its three outputs (None: zero) -> (d w (None without
    w), d u, d k (per key group), d gamma, d s0)."""
    b, h, n, c, dv = v.shape
    dk, group = k.shape[-1], h // k.shape[1]
    d_states = torch.zeros_like(states) if d_states is None else d_states
    d_v = torch.zeros_like(v) if d_v is None else d_v
    d_final = states.new_zeros(b, h, dk, dv) if d_final is None else d_final
    if config is not None:
        d_states, d_final = d_states.contiguous(), d_final.contiguous()
        d_total = d_v.contiguous().clone()  # the kernel adds into it
        ends = torch.empty_like(states)  # the gradient of each chunk's end state
        d_s0 = torch.empty_like(d_final)
        keep = None if keep is None else keep.float().contiguous()
        _scan_bwd[(b * h, -(-dv // config.bv))](None if w is None else w.contiguous(), k.contiguous(),
                                             gamma.contiguous(), keep, d_states, d_total, d_final, ends, d_s0, n, h,
                                             C=c, DK=dk, DV=dv, BV=config.bv, HAS_KEEP=keep is not None,
                                             HAS_W=w is not None, PRECISION=config.precision,
                                             STAGES=config.stages, GROUP=group, num_warps=config.warps)
    else:
        kf = k[:, :, None].expand(b, h // group, group, n, c, dk).reshape(b * h, n, c, dk)
        wf = None if w is None else w.reshape(b * h, n, c, dk)
        gf = gamma.reshape(b * h, n)
        keepf = None if keep is None else keep[:, None].expand(b, h, n).reshape(b * h, n)
        d_sf = _per_head(d_states, group).reshape(b * h, n, dk, dv)
        d_total = d_v.reshape(b * h, n, c, dv).clone()
        g = d_final.reshape(b * h, dk, dv)
        ends = torch.empty_like(d_sf)
        for i in reversed(range(n)):
            ends[:, i] = g
            d_total[:, i] = torch.baddbmm(d_total[:, i], kf[:, i], g)
            g = d_sf[:, i] + gf[:, i, None, None] * g
            if wf is not None:
                g = torch.baddbmm(g, wf[:, i].transpose(1, 2), d_total[:, i], alpha=-1)
            if keepf is not None:
                g = g * keepf[:, i, None, None]
        d_total, d_s0 = d_total.view(v.shape), g.view(b, h, dk, dv)
        ends = _grouped(ends.view(b, h, n, dk, dv), group)
    # TF32 here too where the scan's products are; each group's key gradient sums its heads' (v side by side)
    with tf32_products() if config is not None and config.precision == "tf32" else contextlib.nullcontext():
        d_w = None if w is None else -(d_total @ states.transpose(-1, -2))
        d_k = _grouped(v, group) @ ends.transpose(-1, -2)
    d_gamma = (states * ends).view(b, h // group, n, dk, group, dv).sum((3, 5)).transpose(-1, -2).reshape(b, h, n)
    return d_w, d_total, d_k, d_gamma, d_s0


class _ChunkScan(torch.autograd.Function):
    """scan_forward / scan_backward as an autograd function (config as in scan_forward)."""

    @staticmethod
    def forward(ctx, w, u, k, gamma, s0, keep, config):
        """chunk_scan's arguments and a ScanConfig or None -> (states, v (None without w: it is u), final state)."""
        states, v, final = scan_forward(w, u, k, gamma, s0, keep, config)
        ctx.save_for_backward(w, k, gamma, states, v, keep)
        ctx.config = config
        return states, (None if w is None else v), final

    @staticmethod
    def backward(ctx, d_states, d_v, d_final):
        """Gradients of the three outputs (autograd hands zeros for an unused one) -> (d w, d u, d k, d gamma,
        d s0, None, None)."""
        w, k, gamma, states, v, keep = ctx.saved_tensors
        return (*scan_backward(w, k, gamma, states, v, keep, ctx.config, d_states, d_v, d_final), None, None)


class ScanConfig(NamedTuple):
    """Tiles of the Triton scan: bv (d_v columns per program), warps, stages (software pipelining of the chunk
    loads) and precision of tl.dot ("ieee": fp32 products; "tf32": tensor cores, 10-bit mantissas).

    The default is the fastest measured on an H200 at Qwen3.5-9B's shape (bench/bench_delta_rule.py; 0.2 ms each
    way per layer at 2 x 2048 tokens, against ~1.7 ms forward for the torch loop). There bv 16 with 8 warps and TF32
    faulted (illegal memory access, Triton 3.6) and bv 64 with 8 warps and 2 stages exceeded shared memory."""
    bv: int = 64
    warps: int = 4
    stages: int = 2
    precision: str = "tf32"


def _parse_config(choice: str) -> ScanConfig:
    """FASTTUNE_DELTA_SCAN="bv,warps,stages[,ieee|tf32]" -> ScanConfig. Raises ConfigError for anything else (a bv
    that is not a power of two >= 16 would leave d_v columns unscanned)."""
    parts = choice.split(",")
    try:
        config = ScanConfig(*(int(x) for x in parts[:3]), *parts[3:])
        ok = len(parts) in (3, 4) and config.bv >= 16 and not config.bv & (config.bv - 1) and config.warps > 0 \
            and config.stages > 0 and config.precision in ("ieee", "tf32")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"FASTTUNE_DELTA_SCAN={choice!r}: use 'torch' (the loop) or 'bv,warps,stages[,ieee|tf32]' "
                          f"with bv a power of two >= 16, e.g. '64,4,2,tf32' (the default on CUDA), or unset it.")
    return config


def scan_config(w: torch.Tensor, u: torch.Tensor, tf32: bool = False) -> ScanConfig | None:
    """The Triton scan's tiles for these inputs (w: w or k, for the shapes), or None where the torch loop runs: no
    Triton for w (kernels/dispatch.py), FASTTUNE_DELTA_SCAN=torch, C or d_k not powers of two >= 16 (tl.dot's limits)
    or d_v not a multiple of 16 (the programs take blocks of bv columns, the setting's or d_v rounded up to a power
    of two if smaller, the last block masked: Nemotron-H's heads of 80 run as two blocks of 64, one of them partly
    masked; blocks of 16 reloaded each chunk's keys five times and took 1.07 ms a layer on the H200).
    Products in TF32 only where `tf32` (the caller's inputs were 16-bit, so TF32's 10-bit mantissas lose nothing
    they had) and w is on CUDA; else IEEE fp32. FASTTUNE_DELTA_SCAN="bv,warps,stages,precision" sets the tiles
    (benchmarks; TF32 still only on CUDA); ConfigError for a malformed value."""
    choice = os.environ.get("FASTTUNE_DELTA_SCAN", "")
    c, dk, dv = w.shape[-2], w.shape[-1], u.shape[-1]
    if choice == "torch" or not use_triton(w) or any(x < 16 or x & (x - 1) for x in (c, dk)) or dv % 16:
        return None
    if choice:
        config = _parse_config(choice)
    else:
        config = ScanConfig(precision="tf32" if tf32 else "ieee")
    config = config._replace(bv=min(config.bv, next_pow2(dv)))
    return config if w.is_cuda else config._replace(precision="ieee")


def chunk_scan(w, u, k, gamma, s0, keep=None, tf32: bool = False):
    """chunk_scan_reference's scan (fp32; without w the returned v is None: it is u) with the backward written out:
    by the Triton kernels where scan_config allows (tf32: see there), else the torch loop.

    Keys may be shared by groups of consecutive heads (Mamba-2's B, models/ssd.py): k (B, H / group, n, C, d_k),
    then (without w only) the states come grouped too, (B, H / group, n, d_k, group * d_v), each group's heads' d_v
    columns side by side (a group's product with one (C x d_k) matrix is then one matmul); with group 1 both are
    chunk_scan_reference's. Raises ValueError for w with shared keys."""
    if w is not None and k.shape[1] != u.shape[1]:
        raise ValueError(f"chunk_scan takes w only with a key per head: k has {k.shape[1]} heads, u {u.shape[1]}")
    return _ChunkScan.apply(w, u, k, gamma, s0, keep, scan_config(k, u, tf32))
