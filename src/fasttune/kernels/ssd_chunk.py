"""Mamba-2's scan inside each chunk (models/ssd.py), fused: one Triton program per (row x head, chunk) computes

    y_l = sum_{s <= l} exp(cum_l - cum_s) (C_l . B_s) dt_s x_s  +  exp(cum_l) C_l S  +  D x_l

for the chunk's positions l, with S (d_state x head_dim) the state entering the chunk (the chunk scan's,
kernels/delta_scan.py, in its grouped layout) and cum the running log-decay from the chunk's start. x, dt, B and C are
read where they lie (slices of in_proj's and the conv's outputs) and y is written in (B, T, H, P) order: the torch
form (models/ssd.py) permutes them into per-chunk blocks first and makes a dozen passes over (heads x chunk x chunk)
and (tokens x inner) fp32 tensors, which the H200 profile of Nemotron-Nano-9B-v2 found at about a third of the step.

The backward recomputes the chunk's blocks and writes d x, d dt, d cum, d S and per-program D partial sums; d B and
d C, shared by a group's heads, are added atomically in fp32. The default on CUDA (FASTTUNE_SSD=torch takes the torch
form): measured on an H100 with LoRA and recompute at 2 x 2048 tokens, Granite-4.0-H-micro trains 25% faster with
them (6,989 -> 8,706 tokens/s) and Nemotron-Nano-9B-v2 about as fast (4,894 -> 4,810), bench/results/lora_sft.jsonl.
"""
from __future__ import annotations

import os

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton
from fasttune.kernels.tf32 import tf32_matmul

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _blocks(x_ptr, dt_ptr, cum_ptr, b_ptr, c_ptr, s_ptr, T, H, GROUP, n, P, N, sx_b, sx_t, sdt_b, sdt_t,
                sb_b, sb_t, sc_b, sc_t, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                PRECISION: tl.constexpr):
        """This program's chunk and block of BP head_dim columns: (row, head, chunk, positions, columns, masks, x, dt,
        cum, B, C, S, scores, decay)."""
        bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        row, head = bh // H, bh % H
        grp = head // GROUP
        pos = c * L + tl.arange(0, L)
        rp, rn = tl.program_id(2) * BP + tl.arange(0, BP), tl.arange(0, BN)
        live = pos < T
        xm = live[:, None] & (rp < P)[None, :]
        nm = live[:, None] & (rn < N)[None, :]
        x = tl.load(x_ptr + row * sx_b + pos[:, None] * sx_t + head * P + rp[None, :], mask=xm, other=0.0)
        x = x.to(tl.float32)
        dt = tl.load(dt_ptr + row * sdt_b + pos * sdt_t + head, mask=live, other=0.0).to(tl.float32)
        cum = tl.load(cum_ptr + (bh * n + c) * L + tl.arange(0, L))
        bm = tl.load(b_ptr + row * sb_b + pos[:, None] * sb_t + grp * N + rn[None, :], mask=nm, other=0.0)
        cm = tl.load(c_ptr + row * sc_b + pos[:, None] * sc_t + grp * N + rn[None, :], mask=nm, other=0.0)
        bm, cm = bm.to(tl.float32), cm.to(tl.float32)
        sm = (rn < N)[:, None] & (rp < P)[None, :]
        s_at = ((row * (H // GROUP) + grp) * n + c) * N * GROUP * P + (head % GROUP) * P \
            + rn[:, None] * GROUP * P + rp[None, :]
        s = tl.load(s_ptr + s_at, mask=sm, other=0.0)
        causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        scores = tl.dot(cm, tl.trans(bm), input_precision=PRECISION) * decay
        return row, head, grp, c, pos, rp, live, xm, nm, sm, s_at, x, dt, cum, bm, cm, s, scores, decay

    @triton.jit
    def _ssd_fwd(x_ptr, dt_ptr, cum_ptr, b_ptr, c_ptr, s_ptr, d_ptr, y_ptr, T, H, GROUP, n, P, N, sx_b, sx_t,
                 sdt_b, sdt_t, sb_b, sb_t, sc_b, sc_t, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                 PRECISION: tl.constexpr):
        """y of one (row x head, chunk, column block), in (B, T, H, P) order, with the D skip."""
        row, head, grp, c, pos, rp, live, xm, nm, sm, s_at, x, dt, cum, bm, cm, s, scores, decay = _blocks(
            x_ptr, dt_ptr, cum_ptr, b_ptr, c_ptr, s_ptr, T, H, GROUP, n, P, N, sx_b, sx_t, sdt_b, sdt_t, sb_b, sb_t,
            sc_b, sc_t, L, BP, BN, PRECISION)
        y = tl.dot(scores, x * dt[:, None], input_precision=PRECISION)
        y += tl.exp(cum)[:, None] * tl.dot(cm, s, input_precision=PRECISION)
        y += tl.load(d_ptr + head).to(tl.float32) * x
        tl.store(y_ptr + ((row * T + pos[:, None]) * H + head) * P + rp[None, :], y, mask=xm)

    @triton.jit
    def _ssd_bwd(x_ptr, dt_ptr, cum_ptr, b_ptr, c_ptr, s_ptr, d_ptr, dy_ptr, dx_ptr, ddt_ptr, dcum_ptr, db_ptr,
                 dc_ptr, ds_ptr, dd_ptr, T, H, GROUP, n, P, N, sx_b, sx_t, sdt_b, sdt_t, sb_b, sb_t, sc_b, sc_t,
                 L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        """The gradients of one (row x head, chunk, column block): d x and d S of its columns stored, their sums over
        the columns (d dt, d cum, d B, d C: fp32 buffers of zeros) added atomically, D's partial sum stored."""
        row, head, grp, c, pos, rp, live, xm, nm, sm, s_at, x, dt, cum, bm, cm, s, scores, decay = _blocks(
            x_ptr, dt_ptr, cum_ptr, b_ptr, c_ptr, s_ptr, T, H, GROUP, n, P, N, sx_b, sx_t, sdt_b, sdt_t, sb_b, sb_t,
            sc_b, sc_t, L, BP, BN, PRECISION)
        rn = tl.arange(0, BN)
        dense = ((row * T + pos[:, None]) * H + head) * P + rp[None, :]
        dy = tl.load(dy_ptr + dense, mask=xm, other=0.0)
        xdt = x * dt[:, None]
        d = tl.load(d_ptr + head).to(tl.float32)
        # within the chunk
        d_xdt = tl.dot(tl.trans(scores), dy, input_precision=PRECISION)
        d_scores = tl.dot(dy, tl.trans(xdt), input_precision=PRECISION)
        t = d_scores * scores  # (zero above the diagonal: scores are)
        d_cum = tl.sum(t, axis=1) - tl.sum(t, axis=0)
        d_cb = d_scores * decay
        d_c = tl.dot(d_cb, bm, input_precision=PRECISION)
        d_b = tl.dot(tl.trans(d_cb), cm, input_precision=PRECISION)
        # the carried state's term
        e = tl.exp(cum)
        dye = dy * e[:, None]
        carried = tl.dot(cm, s, input_precision=PRECISION)
        d_cum += tl.sum(dye * carried, axis=1)
        d_c += tl.dot(dye, tl.trans(s), input_precision=PRECISION)
        tl.store(ds_ptr + s_at, tl.dot(tl.trans(cm), dye, input_precision=PRECISION), mask=sm)
        # x, dt and the skip
        tl.store(dx_ptr + dense, d_xdt * dt[:, None] + d * dy, mask=xm)
        tl.atomic_add(ddt_ptr + (row * T + pos) * H + head, tl.sum(d_xdt * x, axis=1), mask=live)
        tl.atomic_add(dcum_ptr + ((row * H + head) * n + c) * L + tl.arange(0, L), d_cum)
        tl.store(dd_ptr + ((row * H + head) * n + c) * tl.num_programs(2) + tl.program_id(2),
                 tl.sum(tl.sum(dy * x, axis=1), axis=0))
        shared = ((row * T + pos[:, None]) * (H // GROUP) + grp) * N + rn[None, :]
        tl.atomic_add(db_ptr + shared, d_b, mask=nm)
        tl.atomic_add(dc_ptr + shared, d_c, mask=nm)


def _sizes(x, B, cum):
    """(B, T, H, P, G, N, chunks, chunk) of the fused kernels' arguments."""
    b, t, h, p = x.shape
    return b, t, h, p, B.shape[2], B.shape[3], cum.shape[2], cum.shape[3]


def _strided(m: torch.Tensor) -> torch.Tensor:
    """m with a unit last stride and its other dims' positions as strides (a slice of a wider tensor as it is)."""
    return m if m.stride(-1) == 1 and (m.dim() < 3 or m.stride(-2) == m.shape[-1]) else m.contiguous()


class _SSDChunkFunction(torch.autograd.Function):
    """ssd_chunk_reference by the Triton kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, cum, B, C, entering, D, precision):
        """See ssd_chunk_reference; returns y (B, T, H, P) fp32."""
        x, dt, B, C = _strided(x), dt.contiguous(), _strided(B), _strided(C)
        cum, entering = cum.contiguous(), entering.contiguous()
        b, t, h, p, g, n_state, chunks, chunk = _sizes(x, B, cum)
        y = torch.empty(b, t, h, p, dtype=torch.float32, device=x.device)
        args = (t, h, h // g, chunks, p, n_state, x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
                B.stride(0), B.stride(1), C.stride(0), C.stride(1))
        # up to 64 head_dim columns a program (the entering state's block is then at most d_state x 64 fp32)
        blocks = dict(L=chunk, BP=min(64, max(16, next_pow2(p))), BN=max(16, next_pow2(n_state)), PRECISION=precision)
        _ssd_fwd[(b * h, chunks, -(-p // blocks["BP"]))](x, dt, cum, B, C, entering, D, y, *args, **blocks,
                                                          num_warps=4)
        ctx.save_for_backward(x, dt, cum, B, C, entering, D)
        ctx.args, ctx.blocks = args, blocks
        return y

    @staticmethod
    def backward(ctx, dy):
        """dy (B, T, H, P) -> (dx, d dt, d cum, dB, dC, d entering, dD, None)."""
        x, dt, cum, B, C, entering, D = ctx.saved_tensors
        b, t, h, p, g, n_state, chunks, chunk = _sizes(x, B, cum)
        dy = dy.contiguous().float()
        dx = torch.empty(b, t, h, p, dtype=torch.float32, device=x.device)
        ddt = torch.zeros(b, t, h, dtype=torch.float32, device=x.device)
        dcum = torch.zeros_like(cum)
        db = torch.zeros(b, t, g, n_state, dtype=torch.float32, device=x.device)
        dc = torch.zeros_like(db)
        ds = torch.zeros_like(entering)
        column_blocks = -(-p // ctx.blocks["BP"])
        dd = torch.empty(b, h, chunks, column_blocks, dtype=torch.float32, device=x.device)
        _ssd_bwd[(b * h, chunks, column_blocks)](x, dt, cum, B, C, entering, D, dy, dx, ddt, dcum, db, dc, ds, dd,
                                                 *ctx.args, **ctx.blocks, num_warps=4)
        return (dx.to(x.dtype), ddt, dcum, db.to(B.dtype), dc.to(C.dtype), ds, dd.sum((0, 2, 3)).to(D.dtype), None)


def ssd_chunk_reference(x, dt, cum, B, C, entering, D, tf32: bool = False):
    """The within-chunk outputs in torch ops (the default form, models/ssd.py). x (B, T, H, P) any float dtype;
    dt (B, T, H) fp32; cum (B, H, n, L) fp32, each chunk's running log-decay (n * L >= T; positions past T ignored);
    B, C (B, T, G, N); entering (B, G, n, N, H / G * P) fp32, the states entering each chunk in delta_scan's grouped
    layout; D (H,); tf32: the products on TF32 tensor cores, forward and backward (kernels/tf32.py; for 16-bit
    callers on CUDA). Returns y (B, T, H, P) fp32 (fp64 for fp64 inputs; module docstring's formula): C_l . B_s once
    per group (its heads share B and C), the decays per head, each group's entering states read in one product."""
    b, t, h, p = x.shape
    g, n_state = B.shape[2], B.shape[3]
    n, chunk = cum.shape[2], cum.shape[3]
    group, pad = h // g, n * chunk - t
    f = torch.promote_types(x.dtype, torch.float32)  # (fp64 for the tests' exact values)
    xdt = torch.nn.functional.pad(x.to(f) * dt[..., None], (0, 0, 0, 0, 0, pad))
    B, C = (torch.nn.functional.pad(m.to(f), (0, 0, 0, 0, 0, pad)) for m in (B, C))
    xdt = xdt.view(b, n, chunk, h, p).permute(0, 3, 1, 2, 4).contiguous()  # (B, H, n, L, P)
    B, C = (m.view(b, n, chunk, g, n_state).permute(0, 3, 1, 2, 4) for m in (B, C))  # (B, G, n, L, N)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    scores = decay.view(b, g, group, n, chunk, chunk) * tf32_matmul(C, B.transpose(-1, -2), tf32)[:, :, None]
    y = tf32_matmul(scores.view(b, h, n, chunk, chunk), xdt, tf32).view(b, g, group, n, chunk, p)
    carried = tf32_matmul(C, entering.to(f), tf32).view(b, g, n, chunk, group, p).permute(0, 1, 4, 2, 3, 5)
    y = torch.addcmul(y, carried, cum.exp().view(b, g, group, n, chunk, 1))
    y = y.view(b, h, n, chunk, p).permute(0, 2, 3, 1, 4).reshape(b, n * chunk, h, p)[:, :t]
    return torch.addcmul(y, x, D.to(f)[:, None])


def fused_ssd_chunk() -> bool:
    """Whether models/ssd.py takes the fused kernels (where use_triton allows): yes unless FASTTUNE_SSD=torch."""
    return os.environ.get("FASTTUNE_SSD", "triton").strip().lower() != "torch"


def ssd_chunk(x, dt, cum, B, C, entering, D, tf32: bool = False) -> torch.Tensor:
    """ssd_chunk_reference's outputs (same arguments and result): by the Triton kernels unless FASTTUNE_SSD=torch,
    where `use_triton(x)` (products on TF32 where `tf32`, on CUDA), else by the reference."""
    if fused_ssd_chunk() and use_triton(x):
        precision = "tf32" if tf32 and x.is_cuda else "ieee"
        return _SSDChunkFunction.apply(x, dt, cum, B, C, entering, D, precision)
    return ssd_chunk_reference(x, dt, cum, B, C, entering, D, tf32)
