"""The selective state-space scan of Mamba-2 layers (Dao & Gu, "Transformers are SSMs", 2024: state space duality),
as transformers' Bamba / GraniteMoeHybrid mixers compute it (their torch path, mamba_ssm's `mamba_chunk_scan_combined`
with dt already discretised).

Per head h with a state S (head_dim x d_state) that starts at zero, for each position t:
    S <- exp(dt_t A_h) S + dt_t x_t B_t^T;   y_t = S C_t + D_h x_t
where x_t (head_dim,) is the head's input, B_t, C_t (d_state,) those of its group (heads / groups consecutive heads
share one), dt_t > 0 its step and A_h < 0.

`ssd_scan` runs whole sequences in the chunked form (fp32): inside a chunk of CHUNK positions the outputs are one
masked product, (C B^T * exp(cumulative decay)) (dt x); between chunks the delta rule's chunk scan carries the state
(kernels/delta_scan.py: linear in the length, Triton on the GPU, its backward written out; transformers' torch path
contracts a chunks x chunks decay matrix instead). Packed runs (documents, padding
runs) each start from a zero state (models/chunk_packing.py). `ssd_step` is one decode step on a kept state.
"""
from __future__ import annotations

import torch

from fasttune.kernels.delta_scan import chunk_scan
from fasttune.kernels.ssd_chunk import fused_ssd_chunk, ssd_chunk
from fasttune.kernels.tf32 import tf32_matmul
from fasttune.models.chunk_packing import run_packed

CHUNK = 64  # positions per chunk: the (chunk x chunk) blocks per head stay small; the result does not depend on it


def ssd_scan(x, dt, A, B, C, D, spans=None, initial_state=None, final_state: bool = False, chunk: int = CHUNK):
    """The scan over whole sequences.

    x (B, T, H, P) any float dtype; dt (B, T, H) fp32 steps (after softplus and clamping); A (H,) fp32 (negative);
    B, C (B, T, G, N) with G dividing H; D (H,). spans: None (each row one sequence) or (row, start, end) runs that
    each start from a zero state (packed documents). initial_state (B, H, P, N) fp32 (rows only, not with spans).
    Returns (y (B, T, H, P) fp32 with the D skip, final state (B, H, P, N) fp32 or None)."""
    if fused_ssd_chunk():  # (opt-in: kernels/ssd_chunk.py)
        if spans is not None:  # (the D skip after, as below: positions no span covers get it too)
            none = torch.zeros_like(D)
            y = run_packed(lambda x_, dt_, b_, c_, keep: _fused(x_, dt_, A, b_, c_, none, keep=keep, chunk=chunk)[0],
                           (x, dt, B, C), spans, chunk)
            return torch.addcmul(y, x, D.float()[:, None]), None
        y, state = _fused(x, dt, A, B, C, D, initial_state, chunk=chunk)
        return y, (state if final_state else None)
    D = D.float()[:, None]  # (H, 1): the skip y + D x in one pass (addcmul), x read in place
    if spans is not None:
        y = run_packed(lambda x_, dt_, b_, c_, keep: _chunked(x_, dt_, A, b_, c_, keep=keep, chunk=chunk)[0],
                       (x, dt, B, C), spans, chunk)
        return torch.addcmul(y, x, D), None
    y, state = _chunked(x, dt, A, B, C, initial_state, chunk=chunk)
    return torch.addcmul(y, x, D), (state if final_state else None)


def _chunked(x, dt, A, B, C, initial_state=None, keep=None, chunk: int = CHUNK):
    """ssd_scan's sum without the D skip, for rows that are each one sequence; keep (B, T / chunk) 0/1 (T a multiple
    of chunk): the carried state is zeroed where a chunk's entry is 0 (packed runs). Returns (y (B, T, H, P) fp32,
    final state (B, H, P, N) fp32)."""
    b, t, h, p = x.shape
    g, n_state = B.shape[2], B.shape[-1]
    group = h // g
    # TF32 products (forward and backward) where the inputs were 16-bit: TF32 keeps all their bits
    tf32 = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    pad = -t % chunk
    xdt = x.float() * dt[..., None]  # (B, T, H, P)
    a = dt * A  # (B, T, H) log-decay per position
    B, C = B.float(), C.float()  # (B, T, G, N)
    if pad:
        xdt, B, C = (torch.nn.functional.pad(m, (0, 0, 0, 0, 0, pad)) for m in (xdt, B, C))
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
    n = (t + pad) // chunk
    # (B, H or G, n, L, ...): heads (groups) first so each chunk's products are batched matmuls
    xdt = xdt.view(b, n, chunk, h, p).permute(0, 3, 1, 2, 4)
    B, C = (m.view(b, n, chunk, g, n_state).permute(0, 3, 1, 2, 4) for m in (B, C))
    cum = a.view(b, n, chunk, h).permute(0, 3, 1, 2).cumsum(-1)  # (B, H, n, L) decay from the chunk's start
    # within a chunk: y_l = sum_{s <= l} exp(cum_l - cum_s) (C_l . B_s) xdt_s, with C_l . B_s once per group (its
    # heads share B and C), the decays per head
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    scores = decay.view(b, g, group, n, chunk, chunk) * tf32_matmul(C, B.transpose(-1, -2), tf32)[:, :, None]
    xdt = xdt.contiguous()
    y = tf32_matmul(scores.view(b, h, n, chunk, chunk), xdt, tf32)  # (B, H, n, L, P)
    # Between chunks, the state (kept transposed, N x P) entering chunk c + 1 is the one entering c times the chunk's
    # decay plus the chunk's own sum_s B_s (exp(cum_last - cum_s) xdt_s)^T: the delta rule's chunk scan
    # (kernels/delta_scan.py: Triton kernels, a written-out backward) with no correction term (w None) and the keys
    # (B) shared by each group's heads, the decay to the chunk's end on the values; the entering states come with each
    # group's heads side by side, so each chunk's C reads them in one product per group
    to_end = (cum[..., -1:] - cum).exp()  # (B, H, n, L)
    total = cum[..., -1].exp()  # (B, H, n) a whole chunk's decay
    state = x.new_zeros(b, h, n_state, p, dtype=torch.float32) if initial_state is None else \
        initial_state.float().transpose(-1, -2).contiguous()
    entering, _, state = chunk_scan(None, xdt * to_end[..., None], B.contiguous(), total, state, keep, tf32)
    carried = tf32_matmul(C, entering, tf32).view(b, g, n, chunk, group, p).permute(0, 1, 4, 2, 3, 5)
    y = torch.addcmul(y.view(b, g, group, n, chunk, p), carried, cum.exp().view(b, g, group, n, chunk, 1))
    y = y.view(b, h, n, chunk, p)  # (+ the carried state read at each position)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, n * chunk, h, p)[:, :t]
    return y, state.transpose(-1, -2)


def _fused(x, dt, A, B, C, D, initial_state=None, keep=None, chunk: int = CHUNK):
    """ssd_scan of rows that are each one sequence (or, with keep, packed runs each starting a chunk, as _chunked
    takes them) with the within-chunk part fused (kernels/ssd_chunk.py: x, dt, B and C read in place, y written in
    (B, T, H, P) order with the D skip); the chunk scan between chunks as in _chunked. Returns (y (B, T, H, P) fp32,
    final state (B, H, P, N) fp32)."""
    b, t, h, p = x.shape
    g, n_state = B.shape[2], B.shape[-1]
    tf32 = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    pad = -t % chunk
    n = (t + pad) // chunk
    cum = torch.nn.functional.pad(dt * A, (0, 0, 0, pad)).view(b, n, chunk, h).permute(0, 3, 1, 2).cumsum(-1)
    cum = cum.contiguous()  # (B, H, n, L)
    # the chunk scan's values dt x exp(cum_last - cum), one product of x as it lies (saved as it is, 16-bit) and a
    # per-position scale
    to_end = (cum[..., -1:] - cum).exp().permute(0, 2, 3, 1).reshape(b, n * chunk, h)[:, :t]
    values = torch.nn.functional.pad(x * (dt * to_end)[..., None], (0, 0, 0, 0, 0, pad))
    values = values.view(b, n, chunk, h, p).permute(0, 3, 1, 2, 4)
    keys = torch.nn.functional.pad(B.float(), (0, 0, 0, 0, 0, pad)).view(b, n, chunk, g, n_state)
    state = x.new_zeros(b, h, n_state, p, dtype=torch.float32) if initial_state is None else \
        initial_state.float().transpose(-1, -2).contiguous()
    entering, _, state = chunk_scan(None, values, keys.permute(0, 3, 1, 2, 4).contiguous(), cum[..., -1].exp(),
                                    state, keep, tf32)
    return ssd_chunk(x, dt, cum, B, C, entering, D, tf32), state.transpose(-1, -2)


def ssd_step(x, dt, A, B, C, D, state: torch.Tensor) -> torch.Tensor:
    """One position per row (decode), as transformers' mamba2_selective_state_update: x (B, H, P); dt (B, H) fp32;
    A (H,) fp32; B, C (B, G, N); D (H,); state (B, H, P, N) fp32, updated in place. Returns y (B, H, P) fp32."""
    group = x.shape[1] // B.shape[1]
    B, C = (m.float().repeat_interleave(group, dim=1) for m in (B, C))  # (B, H, N)
    xf = x.float()
    s = state * (dt * A).exp()[..., None, None] + (dt[..., None] * xf)[..., None] * B[:, :, None]
    state.copy_(s)
    return (s @ C[..., None])[..., 0] + D.float()[:, None] * xf
