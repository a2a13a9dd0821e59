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
from fasttune.kernels.ssd_chunk import ssd_chunk
from fasttune.models.chunk_packing import run_packed

CHUNK = 64  # positions per chunk: the (chunk x chunk) blocks per head stay small; the result does not depend on it


def ssd_scan(x, dt, A, B, C, D, spans=None, initial_state=None, final_state: bool = False, chunk: int = CHUNK):
    """The scan over whole sequences.

    x (B, T, H, P) any float dtype; dt (B, T, H) fp32 steps (after softplus and clamping); A (H,) fp32 (negative);
    B, C (B, T, G, N) with G dividing H; D (H,). spans: None (each row one sequence) or (row, start, end) runs that
    each start from a zero state (packed documents). initial_state (B, H, P, N) fp32 (rows only, not with spans).
    Returns (y (B, T, H, P) fp32 with the D skip, final state (B, H, P, N) fp32 or None)."""
    if spans is not None:  # the D skip after the runs, so that positions no span covers get it too
        none = torch.zeros_like(D)
        y = run_packed(lambda x_, dt_, b_, c_, keep: _rows(x_, dt_, A, b_, c_, none, keep=keep, chunk=chunk)[0],
                       (x, dt, B, C), spans, chunk)
        return torch.addcmul(y, x, D.float()[:, None]), None
    y, state = _rows(x, dt, A, B, C, D, initial_state, chunk=chunk)
    return y, (state if final_state else None)


def _rows(x, dt, A, B, C, D, initial_state=None, keep=None, chunk: int = CHUNK):
    """ssd_scan of rows that are each one sequence (or, with keep (B, T / chunk) 0/1, packed runs that each start a
    chunk: the carried state is zeroed where a chunk's entry is 0). Returns (y (B, T, H, P) fp32 with the D skip,
    final state (B, H, P, N) fp32).

    Between chunks the state (kept transposed, N x P) entering chunk c + 1 is the one entering c times the chunk's
    decay plus the chunk's own sum_s B_s (exp(cum_last - cum_s) dt_s x_s)^T: the delta rule's chunk scan
    (kernels/delta_scan.py: Triton kernels, a written-out backward) with no correction term, the keys (B) shared by
    each group's heads and the decay to the chunk's end on the values. Within chunks: kernels/ssd_chunk.py (the torch
    form under FASTTUNE_SSD=torch, else the fused kernels)."""
    b, t, h, p = x.shape
    g, n_state = B.shape[2], B.shape[-1]
    # TF32 products (forward and backward) where the inputs were 16-bit: TF32 keeps all their bits
    tf32 = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    pad = -t % chunk
    n = (t + pad) // chunk
    cum = torch.nn.functional.pad(dt * A, (0, 0, 0, pad)).view(b, n, chunk, h).permute(0, 3, 1, 2).cumsum(-1)
    cum = cum.contiguous()  # (B, H, n, L) the log-decay from each chunk's start
    # the chunk scan's values dt x exp(cum_last - cum): one product of x as it lies (saved as it is) and a
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
