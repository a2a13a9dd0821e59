"""The within-chunk work of the chunked gated delta rule (kernels/delta_chunk.py, whose docstring has the formulas)
fused into Triton kernels, one program per (row x head, chunk) with its (C x C) and (C x block) tiles in registers
and the products in tl.dot, as flash-linear-attention does; the scan between chunks stays kernels/delta_scan.py's.

    chunk_prepare         G, M, U, W, the scan's inputs k exp(G_C - G) and gamma = exp(G_C)
    chunk_output          o = (q exp(G)) S_i + ((q k^T) * D) V
    chunk_scan_grads      what scan_backward takes from the later ops: (q exp(G))^T do, scores^T do (and its
                          inputs k exp(G_C - G), gamma, recomputed rather than saved)
    chunk_backward        dq, dk, dv, d beta, dg from the scan's gradients: the rest of _ChunkedRule.backward

Why: the torch form writes a dozen fp32 (C x C) and (C x 128) intermediates per chunk to memory and back (the
decay matrix, masks, exp, small batched products): ~3.5 of 6.3 ms per Qwen3.5-9B layer (fwd + bwd, H200). The
d_k and d_v columns are taken `block` at a time so that at C = 64, d = 128 the live tiles fit in registers.
Inside the kernels everything is fp32 (the interpreter's bf16 is wrong; the callers' tensors are fp32 anyway).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fasttune.errors import ConfigError
from fasttune.kernels.dispatch import HAVE_TRITON, use_triton


class ChunkConfig(NamedTuple):
    """Tiles of the within-chunk kernels: block (d_k / d_v columns per step), warps, stages (software pipelining of
    the column loops) and precision of tl.dot ("ieee" or "tf32", as in delta_scan.ScanConfig). The default is the
    fastest measured (H200, Qwen3.5-9B's layer at 2 x 2048, bench/bench_delta_rule.py, forward + backward): 32 / 4 / 1
    3.38 ms, 64 / 8 / 1 3.79 ms, 32 / 8 / 1 4.08 ms; by ptxas's counts its backward spills 196 bytes, which costs less
    than the occupancy 8 warps lose."""
    block: int = 32
    warps: int = 4
    stages: int = 1
    precision: str = "ieee"


def _parse(choice: str) -> ChunkConfig | None:
    """FASTTUNE_DELTA_CHUNK -> None ("torch"), the default ("" or "triton") or "block,warps,stages" -> ChunkConfig.
    ConfigError for anything else."""
    if choice in ("", "triton"):
        return ChunkConfig()
    if choice == "torch":
        return None
    parts = choice.split(",")
    try:
        config = ChunkConfig(*(int(x) for x in parts))
        ok = len(parts) == 3 and config.block >= 16 and not config.block & (config.block - 1) \
            and config.warps > 0 and not config.warps & (config.warps - 1) and config.stages > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"FASTTUNE_DELTA_CHUNK={choice!r}: use 'torch' (the within-chunk work in torch ops), "
                          f"'triton' (the fused kernels, the default where the chunk scan runs in Triton) or "
                          f"'block,warps,stages' with block and warps powers of two, block >= 16, e.g. '32,8,1'.")
    return config


def chunk_config(k: torch.Tensor, v: torch.Tensor, scan, tf32: bool = False) -> ChunkConfig | None:
    """The fused kernels' tiles for k (..., C, d_k), v (..., C, d_v), or None where the torch form runs: the scan in
    torch (scan: delta_scan's ScanConfig or None), no Triton for k (kernels/dispatch.py), FASTTUNE_DELTA_CHUNK=torch,
    or shapes the kernels do not take (C, d_k, d_v powers of two >= 16, C <= 64: C x C fp32 tiles in registers).
    TF32 products where `tf32` (16-bit callers) on CUDA, else IEEE. ConfigError for a malformed setting."""
    config = _parse(os.environ.get("FASTTUNE_DELTA_CHUNK", "").lower())
    c, dk, dv = k.shape[-2], k.shape[-1], v.shape[-1]
    if config is None or scan is None or not use_triton(k) or c > 64 \
            or any(x < 16 or x & (x - 1) for x in (c, dk, dv)):
        return None
    return config._replace(block=min(config.block, dk, dv), precision="tf32" if tf32 and k.is_cuda else "ieee")


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(chunk, r, c, PER: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, WIDTH: tl.constexpr):
        """Offsets of rows r.., columns c.. (ROWS x COLS) of chunk `chunk`'s (PER x WIDTH) matrix in a contiguous
        (..., PER, WIDTH) tensor."""
        return chunk * PER * WIDTH + (r + tl.arange(0, ROWS))[:, None] * WIDTH + c + tl.arange(0, COLS)[None, :]

    @triton.jit
    def _gates(cum, C: tl.constexpr):
        """From G (C): exp(G), exp(G_C - G), exp(G_C) and D (C x C)."""
        rows = tl.arange(0, C)
        last = tl.sum(tl.where(rows == C - 1, cum, 0.0), 0)
        lower = rows[:, None] >= rows[None, :]
        # exp of the masked difference only: above the diagonal it may overflow (nothing forbids g > 0)
        decay = tl.where(lower, tl.exp(tl.where(lower, cum[:, None] - cum[None, :], 0.0)), 0.0)
        return tl.exp(cum), tl.exp(last - cum), tl.exp(last), decay

    @triton.jit
    def _scores(q_ptr, k_ptr, chunk, decay, C: tl.constexpr, DK: tl.constexpr, BD: tl.constexpr,
                PRECISION: tl.constexpr):
        """(q k^T) * D (C x C), the product summed over d_k in blocks."""
        scores = tl.zeros((C, C), tl.float32)
        for j in tl.range(0, DK, BD):
            at = _tile(chunk, 0, j, C, C, BD, DK)
            scores += tl.dot(tl.load(q_ptr + at), tl.trans(tl.load(k_ptr + at)), input_precision=PRECISION)
        return scores * decay

    @triton.jit
    def _prepare(k_ptr, v_ptr, beta_ptr, g_ptr, cum_ptr, m_ptr, u_ptr, w_ptr, ke_ptr, gamma_ptr, C: tl.constexpr,
                 DK: tl.constexpr, DV: tl.constexpr, STEPS: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """chunk_prepare, one chunk per program."""
        chunk = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, C)
        beta = tl.load(beta_ptr + chunk * C + rows)
        cum = tl.cumsum(tl.load(g_ptr + chunk * C + rows), 0)
        tl.store(cum_ptr + chunk * C + rows, cum)
        grow, to_end, gamma, decay = _gates(cum, C)
        tl.store(gamma_ptr + chunk, gamma)
        a = tl.zeros((C, C), tl.float32)
        for j in tl.range(0, DK, BD):
            kj = tl.load(k_ptr + _tile(chunk, 0, j, C, C, BD, DK))
            a += tl.dot(kj * beta[:, None], tl.trans(kj), input_precision=PRECISION)
        a = tl.where(rows[:, None] > rows[None, :], a * decay, 0.0)
        # M = (I + A)^-1 = (I - A)(I + A^2)(I + A^4)...(I + A^(C/2)), as delta_chunk.unit_lower_inverse
        m = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) - a
        power = tl.dot(a, a, input_precision=PRECISION)
        for step in tl.static_range(STEPS):
            m += tl.dot(m, power, input_precision=PRECISION)
            if step < STEPS - 1:
                power = tl.dot(power, power, input_precision=PRECISION)
        tl.store(m_ptr + _tile(chunk, 0, 0, C, C, C, C), m)
        for j in tl.range(0, DV, BD):
            at = _tile(chunk, 0, j, C, C, BD, DV)
            tl.store(u_ptr + at, tl.dot(m, tl.load(v_ptr + at) * beta[:, None], input_precision=PRECISION))
        for j in tl.range(0, DK, BD):
            at = _tile(chunk, 0, j, C, C, BD, DK)
            kj = tl.load(k_ptr + at)
            tl.store(w_ptr + at, tl.dot(m, kj * (beta * grow)[:, None], input_precision=PRECISION))
            tl.store(ke_ptr + at, kj * to_end[:, None])

    @triton.jit
    def _output(q_ptr, k_ptr, cum_ptr, states_ptr, values_ptr, o_ptr, C: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """chunk_output, one chunk per program, d_v block by block."""
        chunk = tl.program_id(0).to(tl.int64)
        grow, _, _, decay = _gates(tl.load(cum_ptr + chunk * C + tl.arange(0, C)), C)
        scores = _scores(q_ptr, k_ptr, chunk, decay, C, DK, BD, PRECISION)
        for i in tl.range(0, DV, BD):
            at = _tile(chunk, 0, i, C, C, BD, DV)
            o = tl.dot(scores, tl.load(values_ptr + at), input_precision=PRECISION)
            for j in tl.range(0, DK, BD):
                q_grown = tl.load(q_ptr + _tile(chunk, 0, j, C, C, BD, DK)) * grow[:, None]
                state = tl.load(states_ptr + _tile(chunk, j, i, DK, BD, BD, DV))
                o += tl.dot(q_grown, state, input_precision=PRECISION)
            tl.store(o_ptr + at, o)

    @triton.jit
    def _scan_grads(q_ptr, k_ptr, cum_ptr, do_ptr, ke_ptr, gamma_ptr, ds_ptr, dv_ptr, C: tl.constexpr,
                    DK: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """chunk_scan_grads, one chunk per program."""
        chunk = tl.program_id(0).to(tl.int64)
        grow, to_end, gamma, decay = _gates(tl.load(cum_ptr + chunk * C + tl.arange(0, C)), C)
        tl.store(gamma_ptr + chunk, gamma)
        scores = _scores(q_ptr, k_ptr, chunk, decay, C, DK, BD, PRECISION)
        for j in tl.range(0, DK, BD):
            at = _tile(chunk, 0, j, C, C, BD, DK)
            tl.store(ke_ptr + at, tl.load(k_ptr + at) * to_end[:, None])
        for i in tl.range(0, DV, BD):
            at = _tile(chunk, 0, i, C, C, BD, DV)
            d_o = tl.load(do_ptr + at)
            tl.store(dv_ptr + at, tl.dot(tl.trans(scores), d_o, input_precision=PRECISION))
            for j in tl.range(0, DK, BD):
                q_grown = tl.load(q_ptr + _tile(chunk, 0, j, C, C, BD, DK)) * grow[:, None]
                tl.store(ds_ptr + _tile(chunk, j, i, DK, BD, BD, DV),
                         tl.dot(tl.trans(q_grown), d_o, input_precision=PRECISION))

    @triton.jit
    def _backward(q_ptr, k_ptr, v_ptr, beta_ptr, cum_ptr, m_ptr, states_ptr, values_ptr, do_ptr, dw_ptr, du_ptr,
                  dke_ptr, dgamma_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, C: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """chunk_backward, one chunk per program: the (C x C) gradients first (d scores, dA), then the columns of
        dv, dq and dk block by block; d_cum collects dG and becomes dg by a reverse cumulative sum."""
        chunk = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, C)
        beta = tl.load(beta_ptr + chunk * C + rows)
        cum = tl.load(cum_ptr + chunk * C + rows)
        grow, to_end, gamma, decay = _gates(cum, C)
        # o = (q exp(G)) S + scores V: d scores = do V^T; G gets d scores * scores through D
        scores = _scores(q_ptr, k_ptr, chunk, decay, C, DK, BD, PRECISION)
        d_scores = tl.zeros((C, C), tl.float32)
        for i in tl.range(0, DV, BD):
            at = _tile(chunk, 0, i, C, C, BD, DV)
            d_scores += tl.dot(tl.load(do_ptr + at), tl.trans(tl.load(values_ptr + at)), input_precision=PRECISION)
        through = d_scores * scores
        d_cum = tl.sum(through, 1) - tl.sum(through, 0)
        masked = d_scores * decay
        # dq = (do S^T) exp(G) + masked k and dk's first term masked^T q, here where the other (C x C) tiles are
        # not yet live (registers: it spilled at C = 64, d = 128 with these below)
        for j in tl.range(0, DK, BD):
            at = _tile(chunk, 0, j, C, C, BD, DK)
            qj, kj = tl.load(q_ptr + at), tl.load(k_ptr + at)
            d_q_grown = tl.zeros((C, BD), tl.float32)
            for i in tl.range(0, DV, BD):
                d_o = tl.load(do_ptr + _tile(chunk, 0, i, C, C, BD, DV))
                state = tl.load(states_ptr + _tile(chunk, j, i, DK, BD, BD, DV))
                d_q_grown += tl.dot(d_o, tl.trans(state), input_precision=PRECISION)
            d_cum += tl.sum(d_q_grown * qj * grow[:, None], 1)
            tl.store(dq_ptr + at, d_q_grown * grow[:, None] + tl.dot(masked, kj, input_precision=PRECISION))
            tl.store(dk_ptr + at, tl.dot(tl.trans(masked), qj, input_precision=PRECISION))
        tl.debug_barrier()  # the loads of dk below may fall to other threads than these stores did
        # dM = dU (beta v)^T + dW (beta k exp(G))^T;  dA = -(M^T dM M^T) strictly lower, times D
        kk = tl.zeros((C, C), tl.float32)  # (beta k) k^T
        d_m = tl.zeros((C, C), tl.float32)
        for j in tl.range(0, DK, BD):
            at = _tile(chunk, 0, j, C, C, BD, DK)
            kj = tl.load(k_ptr + at)
            kk += tl.dot(kj * beta[:, None], tl.trans(kj), input_precision=PRECISION)
            d_m += tl.dot(tl.load(dw_ptr + at), tl.trans(kj * (beta * grow)[:, None]), input_precision=PRECISION)
        for i in tl.range(0, DV, BD):
            at = _tile(chunk, 0, i, C, C, BD, DV)
            d_m += tl.dot(tl.load(du_ptr + at), tl.trans(tl.load(v_ptr + at) * beta[:, None]),
                          input_precision=PRECISION)
        mt = tl.trans(tl.load(m_ptr + _tile(chunk, 0, 0, C, C, C, C)))
        d_a = -tl.dot(tl.dot(mt, d_m, input_precision=PRECISION), mt, input_precision=PRECISION)
        d_a = tl.where(rows[:, None] > rows[None, :], d_a * decay, 0.0)
        through = d_a * kk
        d_cum += tl.sum(through, 1) - tl.sum(through, 0)
        # d(beta v) = M^T dU
        d_beta = tl.zeros((C,), tl.float32)
        for i in tl.range(0, DV, BD):
            at = _tile(chunk, 0, i, C, C, BD, DV)
            d_vb = tl.dot(mt, tl.load(du_ptr + at), input_precision=PRECISION)
            tl.store(dv_ptr + at, d_vb * beta[:, None])
            d_beta += tl.sum(d_vb * tl.load(v_ptr + at), 1)
        ke_term = tl.zeros((C,), tl.float32)
        for j in tl.range(0, DK, BD):
            at = _tile(chunk, 0, j, C, C, BD, DK)
            kj = tl.load(k_ptr + at)
            # d(beta k exp(G)) = M^T dW; d(beta k) adds dA k; k's gradient from every product it is in
            kb = kj * beta[:, None]
            d_kb_grown = tl.dot(mt, tl.load(dw_ptr + at), input_precision=PRECISION)
            d_cum += tl.sum(d_kb_grown * kb * grow[:, None], 1)
            d_kb = d_kb_grown * grow[:, None] + tl.dot(d_a, kj, input_precision=PRECISION)
            d_ke = tl.load(dke_ptr + at)
            dk = tl.load(dk_ptr + at) + tl.dot(tl.trans(d_a), kb, input_precision=PRECISION) + d_kb * beta[:, None] \
                + d_ke * to_end[:, None]
            tl.store(dk_ptr + at, dk)
            d_beta += tl.sum(d_kb * kj, 1)
            ke_term += tl.sum(d_ke * kj * to_end[:, None], 1)
        tl.store(dbeta_ptr + chunk * C + rows, d_beta)
        # the scan's inputs k exp(G_C - G) and gamma = exp(G_C)
        d_cum += tl.where(rows == C - 1, tl.sum(ke_term, 0) + tl.load(dgamma_ptr + chunk) * gamma, 0.0) - ke_term
        tl.store(dg_ptr + chunk * C + rows, tl.cumsum(d_cum, 0, reverse=True))

    def _launch(kernel, chunks, config, *args, **sizes):
        kernel[(chunks,)](*args, **sizes, BD=config.block, PRECISION=config.precision, num_warps=config.warps,
                          num_stages=config.stages)


def _chunks(x: torch.Tensor) -> int:
    return x.shape[:-2].numel()


def chunk_prepare(k, v, beta, g, config: ChunkConfig):
    """k (B, H, n, C, d_k), v (B, H, n, C, d_v), beta, g (B, H, n, C), fp32 -> (G (B, H, n, C), M (B, H, n, C, C),
    U (like v), W (like k), k exp(G_C - G) (like k), gamma = exp(G_C) (B, H, n)), all fp32."""
    k, v, beta, g = (x.contiguous() for x in (k, v, beta, g))
    c, dk, dv = k.shape[-2], k.shape[-1], v.shape[-1]
    cum, gamma = torch.empty_like(g), g.new_empty(g.shape[:-1])
    inverse = k.new_empty(*k.shape[:-1], c)
    u, w, ke = torch.empty_like(v), torch.empty_like(k), torch.empty_like(k)
    _launch(_prepare, _chunks(k), config, k, v, beta, g, cum, inverse, u, w, ke, gamma, C=c, DK=dk, DV=dv,
            STEPS=c.bit_length() - 2)
    return cum, inverse, u, w, ke, gamma


def chunk_output(q, k, cum, states, values, config: ChunkConfig):
    """q, k (B, H, n, C, d_k), G (B, H, n, C), states (B, H, n, d_k, d_v) (each chunk's starting state), values
    (B, H, n, C, d_v) (the corrected values), fp32 -> o (B, H, n, C, d_v) fp32."""
    q, k, cum, states, values = (x.contiguous() for x in (q, k, cum, states, values))
    o = torch.empty_like(values)
    _launch(_output, _chunks(k), config, q, k, cum, states, values, o, C=k.shape[-2], DK=k.shape[-1],
            DV=values.shape[-1])
    return o


def chunk_scan_grads(q, k, cum, d_o, config: ChunkConfig):
    """The scan's inputs and the gradients the later ops send it: q, k (B, H, n, C, d_k), G, do (B, H, n, C, d_v)
    -> (k exp(G_C - G) (like k), gamma (B, H, n), d states = (q exp(G))^T do (B, H, n, d_k, d_v),
    d values = ((q k^T) * D)^T do (like do)), fp32."""
    q, k, cum, d_o = (x.contiguous() for x in (q, k, cum, d_o))
    c, dk, dv = k.shape[-2], k.shape[-1], d_o.shape[-1]
    ke, gamma = torch.empty_like(k), cum.new_empty(cum.shape[:-1])
    d_states, d_values = k.new_empty(*k.shape[:-2], dk, dv), torch.empty_like(d_o)
    _launch(_scan_grads, _chunks(k), config, q, k, cum, d_o, ke, gamma, d_states, d_values, C=c, DK=dk, DV=dv)
    return ke, gamma, d_states, d_values


def chunk_backward(q, k, v, beta, cum, inverse, states, values, d_o, d_w, d_u, d_ke, d_gamma, config: ChunkConfig):
    """The forward's q, k, v, beta, G, M, states and values, do and the scan's gradients of W, U, k exp(G_C - G)
    (like k, v, k) and gamma (B, H, n), fp32 -> (dq, dk, dv, d beta, dg) shaped like q, k, v, beta, G."""
    q, k, v, beta, cum, inverse, states, values, d_o, d_w, d_u, d_ke, d_gamma = (x.contiguous() for x in (
        q, k, v, beta, cum, inverse, states, values, d_o, d_w, d_u, d_ke, d_gamma))
    dq, dk, dv, d_beta, dg = (torch.empty_like(x) for x in (q, k, v, beta, cum))
    _launch(_backward, _chunks(k), config, q, k, v, beta, cum, inverse, states, values, d_o, d_w, d_u, d_ke,
            d_gamma, dq, dk, dv, d_beta, dg, C=k.shape[-2], DK=k.shape[-1], DV=v.shape[-1])
    return dq, dk, dv, d_beta, dg
