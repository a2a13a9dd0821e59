"""Per-row statistics of a chunk of LM-head logits in one read: what kernels/token_logprobs.py's fused forward needs.

For logits x (rows, V) as the head's GEMM wrote them (16-bit, or fp32 with the fp32 head) and z = softcap(x) /
temperature, one Triton program per row walks the vocabulary once with an online softmax (running max m, sum
s = sum exp(z - m)) and returns, in fp32:
- lse = logsumexp(z) and z_label (log p(label) = z_label - lse);
- the entropy log s + q / s, q = sum exp(z - m) (m - z) (non-negative terms, as the chunked loss's STATS pass);
- TRL's DPO extras (token_logprobs.EXTRAS): the mean of z, whether the label is the first argmax (no earlier column
  reaches the maximum), and log sum_v p_v^2 = log s2 - 2 log s with s2 = sum exp(2 (z - m)).
The torch reference upcasts the chunk to fp32 and takes each statistic with its own reduction (several passes over
rows x V floats); the kernel reads each logit once, which is what makes DPO's token metrics nearly free.
"""
from __future__ import annotations

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton

STATS = ("lse", "z_label", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")  # columns of the result
_BLOCK = 4096


def _scaled(logits: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64 (the tests' exact oracle)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def logit_row_stats_reference(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None,
                              temperature: float = 1.0, entropy: bool = False, extras: bool = False) -> torch.Tensor:
    """The torch path of logit_row_stats (same arguments and result)."""
    z = _scaled(logits, softcap, temperature)
    lse = torch.logsumexp(z, -1)
    out = torch.zeros(z.shape[0], len(STATS), dtype=z.dtype, device=z.device)
    out[:, 0], out[:, 1] = lse, z.gather(1, labels[:, None]).squeeze(1)
    if entropy:  # sum_v p_v (lse - z_v): non-negative terms, no cancellation where the entropy is small
        zl = z - lse[:, None]
        out[:, 2] = -(zl.exp() * zl).sum(-1)
    if extras:
        out[:, 3] = z.mean(-1)
        out[:, 4] = (z.argmax(-1) == labels).to(z.dtype)  # torch.argmax: the first maximum
        out[:, 5] = torch.logsumexp(2 * z, -1) - 2 * lse
    return out


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_stats_kernel(x_ptr, labels_ptr, out_ptr, n_cols, stride, softcap, inv_t, SOFTCAP: tl.constexpr,
                          ENTROPY: tl.constexpr, EXTRAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows * V can pass 2**31
        ptr = x_ptr + row * stride
        label = tl.load(labels_ptr + row)
        label = tl.minimum(tl.maximum(label, 0), n_cols - 1)
        cols = tl.arange(0, BLOCK)
        m = float("-inf")
        s = 0.0
        q = 0.0
        z_sum = 0.0
        before = float("-inf")
        s2 = 0.0
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = (2.0 * tl.sigmoid(2.0 * (z / softcap)) - 1.0) * softcap  # tanh (libdevice's: not interpretable)
            z = z * inv_t
            if EXTRAS:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
                before = tl.maximum(before, tl.max(tl.where(mask & (start + cols < label), z, float("-inf")), axis=0))
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            p = tl.exp(z - m_new)
            rescale = tl.exp(m - m_new)
            if ENTROPY:
                q = tl.where(s > 0, rescale * (q + (m_new - m) * s), 0.0) + \
                    tl.sum(tl.where(mask, p * (m_new - z), 0.0), axis=0)
            if EXTRAS:
                s2 = s2 * rescale * rescale + tl.sum(p * p, axis=0)
            s = s * rescale + tl.sum(p, axis=0)
            m = m_new
        zy = tl.load(ptr + label).to(tl.float32)
        if SOFTCAP:
            zy = (2.0 * tl.sigmoid(2.0 * (zy / softcap)) - 1.0) * softcap
        zy = zy * inv_t
        o = out_ptr + row * 6
        tl.store(o, m + tl.log(s))
        tl.store(o + 1, zy)
        if ENTROPY:
            tl.store(o + 2, tl.log(s) + q / s)
        if EXTRAS:
            tl.store(o + 3, z_sum / n_cols)
            tl.store(o + 4, tl.where((zy >= m) & (zy > before), 1.0, 0.0))
            tl.store(o + 5, tl.log(s2) - 2.0 * tl.log(s))


def logit_row_stats(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None,
                    temperature: float = 1.0, entropy: bool = False, extras: bool = False) -> torch.Tensor:
    """Statistics of each row of logits (rows, V) (16-bit or fp32, as the head's product wrote them; fp64 in tests)
    under z = softcap(logits) / temperature, at labels (rows,) int64 in [0, V): (rows, 6) fp32 (fp64 for fp64
    logits) with the STATS columns; the entropy column is 0 unless `entropy`, the last three 0 unless `extras`.
    No gradient. One Triton pass per row on CUDA (see the module doc), else logit_row_stats_reference."""
    if not (use_triton(logits) and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return logit_row_stats_reference(logits, labels, softcap, temperature, entropy, extras)
    rows, vocab = logits.shape
    out = torch.zeros(rows, len(STATS), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    assert logits.stride(1) == 1, "the kernel walks contiguous vocab rows"
    block = min(_BLOCK, next_pow2(vocab))
    _row_stats_kernel[(rows,)](logits, labels.contiguous(), out, vocab, logits.stride(0), float(softcap or 1.0),
                               1.0 / temperature, SOFTCAP=bool(softcap), ENTROPY=entropy, EXTRAS=extras,
                               BLOCK=block, num_warps=min(8, max(1, block // 512)))
    return out
