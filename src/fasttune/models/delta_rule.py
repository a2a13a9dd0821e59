"""The gated delta rule of Qwen3.5's linear-attention layers (Yang, Kautz & Hatamizadeh, "Gated Delta Networks",
2024), as transformers' Qwen3Next/Qwen3.5 layers compute it.

Per value head, with a state S (d_k x d_v) that starts at zero, for each position t:
    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T q_t
with q, k L2-normalised (eps 1e-6 inside the square root) and q scaled by d_k ** -0.5. Each query/key head serves
`value heads / key heads` consecutive value heads.

`gated_delta_rule` runs a whole sequence: on CUDA with flash-linear-attention installed, its chunked Triton kernels
(`fla.ops.gated_delta_rule.chunk_gated_delta_rule`, forward and backward); otherwise `chunked_delta_rule`, the same
chunked form in torch (fp32; on CUDA with 16-bit inputs its products in TF32 and the chunk scan in Triton).
`delta_rule_step` is one decode step on a kept state.
"""
from __future__ import annotations

import functools
import os

import torch

from fasttune.kernels.delta_chunk import chunked_rule
from fasttune.kernels.delta_scan import scan_config
from fasttune.models.chunk_packing import run_packed

CHUNK = 64  # positions per chunk of the chunked form (fla's and transformers' size)
L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim, in x's dtype (fla's and transformers' l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


@functools.lru_cache(maxsize=None)
def _fla_chunk():
    """fla's chunked kernel, or None when flash-linear-attention is not installed or FASTTUNE_FLA=0."""
    if os.environ.get("FASTTUNE_FLA", "1") == "0":
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, or its Triton cannot load here
        return None
    return chunk_gated_delta_rule


class FlaUnusableWarning(UserWarning):
    """flash-linear-attention is installed but failed its first forward/backward on this GPU: the torch form runs."""


@functools.lru_cache(maxsize=None)
def _fla_works(device: torch.device) -> bool:
    """One small bf16 forward and backward through fla on `device`: fla refuses some GPU/Triton pairs (e.g. Hopper
    with Triton 3.4 to 3.7.0, whose gated backward it knows to be wrong) and may fail to compile elsewhere; then
    gated_delta_rule keeps to the torch form, with one FlaUnusableWarning naming fla's reason."""
    import warnings

    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 64, 2, 64, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        decay = -torch.rand(1, 64, 2, device=device, generator=g).requires_grad_()
        beta = torch.rand(1, 64, 2, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        o, _ = _fla_chunk()(q, k, v, decay, beta, use_qk_l2norm_in_kernel=True)
        o.float().sum().backward()
        return True
    except Exception as e:  # any failure of the optional kernels: the torch form gives the same values
        warnings.warn(f"flash-linear-attention cannot run the gated delta rule on this GPU ({type(e).__name__}: "
                      f"{str(e)[:300]}); Qwen3.5's linear-attention layers use fasttune's torch form instead "
                      f"(same results, slower).", FlaUnusableWarning, stacklevel=3)
        return False


def uses_fla(x: torch.Tensor) -> bool:
    """Whether gated_delta_rule runs fla's kernels for tensors like x: on CUDA, with flash-linear-attention
    importable, FASTTUNE_FLA not 0, and fla's kernels working on that GPU (_fla_works)."""
    return x.is_cuda and _fla_chunk() is not None and _fla_works(x.device)


def gated_delta_rule(q, k, v, g, beta, spans=None, initial_state=None, final_state: bool = False):
    """The gated delta rule over whole sequences.

    q, k (B, T, Hk, dk); v (B, T, Hv, dv) (Hv a multiple of Hk); g (B, T, Hv) fp32 log-decay (<= 0); beta (B, T, Hv)
    in (0, 1). spans: None (each row one sequence), or a list of (row, start, end) runs, each its own sequence
    starting from a zero state (packed documents, padding runs). initial_state (B, Hv, dk, dv) fp32 (rows only,
    not with spans). Returns (o (B, T, Hv, dv) in v's dtype, final state (B, Hv, dk, dv) fp32 or None)."""
    if uses_fla(q):
        return _fla(q, k, v, g, beta, spans, initial_state, final_state)
    if spans is None:
        return chunked_delta_rule(q, k, v, g, beta, initial_state, final_state)
    return _packed(q, k, v, g, beta, spans), None


def _packed(q, k, v, g, beta, spans, chunk: int = CHUNK):
    """Runs that each start from a zero state, in one chunked pass (models/chunk_packing.py): inert positions pad
    each run to whole chunks (zero key, value, decay and beta), and the scan zeroes the state as a run starts."""
    return run_packed(lambda *x: chunked_delta_rule(*x[:5], keep=x[5], chunk=chunk)[0], (q, k, v, g, beta), spans,
                      chunk)


def _fla(q, k, v, g, beta, spans, initial_state, final_state):
    chunk = _fla_chunk()
    if spans is None:
        return chunk(q, k, v, g, beta, initial_state=initial_state, output_final_state=final_state,
                     use_qk_l2norm_in_kernel=True)
    b, t = q.shape[:2]
    # All runs as one packed row with fla's varlen boundaries (cu_seqlens, FlashAttention's convention).
    starts = torch.tensor([row * t + s for row, s, _ in spans] + [b * t], dtype=torch.long, device=q.device)
    flat = [x.reshape(1, b * t, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o, _ = chunk(*flat, use_qk_l2norm_in_kernel=True, cu_seqlens=starts, cu_seqlens_cpu=starts.cpu())
    return o.reshape(v.shape), None


def chunked_delta_rule(q, k, v, g, beta, initial_state=None, final_state: bool = False, chunk: int = CHUNK,
                       keep=None):
    """gated_delta_rule in torch for one sequence per row, chunk positions at a time (same arguments; fp32 math);
    keep (B, T / chunk) 0/1: the state is zeroed where a chunk's entry is 0 (kernels/delta_scan.py; packed runs).

    Inside a chunk the updates are solved at once: with G the cumulative log-decay from the chunk start and
    A[s, r] = beta_s exp(G_s - G_r) k_s . k_r (r < s), the corrected values are
    U = (I + A)^-1 (beta V - beta exp(G) K S0), the outputs O = exp(G) Q S0 + (Q K^T * exp(G_t - G_s), s <= t) U and
    the state S = exp(G_C) S0 + sum_s exp(G_C - G_s) k_s u_s^T (the WY form of the delta rule, Yang et al. 2024).
    This prepares the chunks (normalised, grouped heads repeated, padded) for kernels/delta_chunk.py, which runs
    these formulas with the backward written out; the chunk size must be a power of two (its unit_lower_inverse).
    On CUDA with 16-bit inputs the fp32 products run on TF32 tensor cores (kernels/tf32.py): 10-bit mantissas, more
    than bf16 carries."""
    dtype = v.dtype
    tf32 = q.is_cuda and dtype in (torch.bfloat16, torch.float16)
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2:]
    group = hv // hk
    q, k = l2_normalize(q.float()) * dk ** -0.5, l2_normalize(k.float())
    # (B, Hv, T, d) and (B, Hv, T), each made contiguous in one copy, padded to whole chunks (zero keys and values;
    # zero log-decay)
    q, k = (x.transpose(1, 2).repeat_interleave(group, dim=1) for x in (q, k))
    v, g, beta = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in (v, g, beta))
    pad = -t % chunk
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, hv, n, chunk, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, hv, n, chunk) for x in (g, beta))
    state = q.new_zeros(b, hv, dk, dv) if initial_state is None else initial_state.float()
    # the chunks' own work and the scan carrying the state between them (kernels/delta_chunk.py, delta_scan.py)
    o, state = chunked_rule(q, k, v, beta, g, state, keep, scan_config(q, v, tf32), tf32)
    o = o.reshape(b, hv, n * chunk, dv)[:, :, :t]
    return o.transpose(1, 2).to(dtype), (state if final_state else None)


def delta_rule_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One position per row (decode): q, k (B, 1, Hk, dk), v (B, 1, Hv, dv), g, beta (B, 1, Hv); state
    (B, Hv, dk, dv) fp32, updated in place. Returns o (B, 1, Hv, dv) in v's dtype."""
    group = v.shape[2] // k.shape[2]
    q, k = (l2_normalize(x[:, 0].float()).repeat_interleave(group, dim=1) for x in (q, k))
    q = q * k.shape[-1] ** -0.5
    s = state * g[:, 0].float().exp()[..., None, None]
    u = (v[:, 0].float() - (s * k[..., None]).sum(-2)) * beta[:, 0].float()[..., None]
    s = s + k[..., None] * u[..., None, :]
    state.copy_(s)
    return (s * q[..., None]).sum(-2)[:, None].to(v.dtype)
