"""Per-token divergence between a student's and a teacher's next-token distributions, computed from both models'
hidden states and LM heads in chunks of tokens, so the (tokens x vocab) logits of either model never exist at once
(on-policy distillation: train/objectives/distillation.py).

With z = softcap(h @ W^T) / temperature for each model (its own head, softcap and hidden size; the teacher's head cut
to the student's vocabulary), p_s = softmax(z_s), p_t = softmax(z_t), the divergence of TRL 1.16's DistillationTrainer
(its `beta`; Agarwal et al. 2024, GKD):
- beta = 0: the forward KL(p_t || p_s);
- beta = 1: the reverse KL(p_s || p_t);
- else the generalized Jensen-Shannon divergence beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s +
  beta p_t.
Its gradient reaches only the student: d D / d z_s = p_s * (a - E_{p_s}[a]) with a = -p_t / p_s (beta 0), log p_s - log
p_t (beta 1), (1 - beta)(log p_s - log m) (the JSD). Backward recomputes both models' logits chunk by chunk. The
student's entropy -sum p_s log p_s comes with the divergence (no gradient).

- reference: plain log_softmax per chunk under torch.utils.checkpoint (autograd through the formulas above).
- fused (default with a gradient): forward keeps nothing but its inputs; backward applies the closed-form gradient.

topk_token_divergence is the same divergence on the student's top-k tokens only (TRL's self-distillation trainers:
SDFT), torch only.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from fasttune.kernels.cross_entropy import _chunk_tokens
from fasttune.kernels.dispatch import kernel_choice


def _logits(hidden, weight, softcap, temperature):
    """fp32 logits (rows, V) of one model after its final softcap and the temperature; (logits, tanh or None)."""
    z = (hidden @ weight.to(hidden.dtype).t()).float()
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    return z / temperature, t


def _chunk_terms(hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t):
    """(divergence (rows,), student entropy (rows,), log p_s, log p_t, log m or None, tanh of the student's softcap)
    of one chunk; differentiable in hs / ws (the reference path)."""
    zs, ts = _logits(hs, ws, softcap_s, temperature)
    zt, _ = _logits(ht, wt, softcap_t, temperature)
    lps, lpt = zs.log_softmax(-1), zt.log_softmax(-1)
    entropy = -(lps.exp() * lps).sum(-1)
    div, lm = _divergence(lps, lpt, beta)
    return div, entropy, lps, lpt, lm, ts


def _divergence(lps, lpt, beta):
    """(divergence (rows,) over the last axis of two log-distributions lps (student) / lpt (teacher), by beta as in
    the module docstring; log m of the JSD's mixture, or None)."""
    ps, lm = lps.exp(), None
    if beta == 0.0:
        div = (lpt.exp() * (lpt - lps)).sum(-1)
    elif beta == 1.0:
        div = (ps * (lps - lpt)).sum(-1)
    else:
        lm = torch.logaddexp(lps + math.log(1 - beta), lpt + math.log(beta))
        div = beta * (lpt.exp() * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
    return div, lm


def _with_tail(logp):
    """A top-k support's log-probs (rows, k), which sum to the mass P they hold, with one more entry for the rest: log
    (1 - P) (TRL's add_tail_bucket; P capped just below 1)."""
    held = logp.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logp, torch.log(-torch.expm1(held))], dim=-1)


def _topk_chunk(hs, ws, ht, wt, k, beta, add_tail, temperature, softcap_s, softcap_t):
    zs, _ = _logits(hs, ws, softcap_s, temperature)
    zt, _ = _logits(ht, wt, softcap_t, temperature)
    top, idx = zs.topk(k, dim=-1)
    lps = top - zs.logsumexp(-1, keepdim=True)
    lpt = zt.gather(-1, idx) - zt.logsumexp(-1, keepdim=True)
    if add_tail:
        lps, lpt = _with_tail(lps), _with_tail(lpt)
    else:  # the top-k conditional distributions
        lps, lpt = lps.log_softmax(-1), lpt.log_softmax(-1)
    return _divergence(lps, lpt, beta)[0]


def topk_token_divergence(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, k: int,
                          beta: float, add_tail: bool = False, temperature: float = 1.0,
                          softcap_s: float | None = None, softcap_t: float | None = None,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """The divergence of each token on the student's top-k tokens, as TRL 1.16's self-distillation trainers (SDFT,
    SDPO) compute their default loss (trl.experimental.sdft.loss_utils.compute_topk_self_distillation_loss): both
    models' log-probs (logits as in token_divergence) at the k tokens the student ranks highest, renormalised over
    those k (add_tail=False) or with one more entry for the mass outside them (add_tail=True), then the divergence
    of `beta` (module docstring) between the two. Torch only, chunk by chunk (under activation checkpointing when
    a gradient is needed), so the logits of at most one chunk exist at once.

    Args: hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t, chunk_tokens as token_divergence; k: 1 <= k <= the
        student's vocabulary. Returns: (N,) fp32 divergences, differentiable in hs and ws (the top-k choice is not).
    Raises: ValueError as token_divergence, and for k outside [1, vocabulary].
    """
    _check(hs, ws, ht, wt, beta)
    if not 1 <= k <= ws.shape[0]:
        raise ValueError(f"k={k} must be in [1, {ws.shape[0]}] (the student's vocabulary)")
    wt = wt[:ws.shape[0]]
    chunk = chunk_tokens or max(1, _chunk_tokens(ws.shape[0]) // 2)
    grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
    divs = []
    for start in range(0, hs.shape[0], chunk):
        args = (hs[start:start + chunk], ws, ht[start:start + chunk].detach(), wt.detach(), k, beta, add_tail,
                temperature, softcap_s, softcap_t)
        divs.append(checkpoint(_topk_chunk, *args, use_reentrant=False) if grad else _topk_chunk(*args))
    return torch.cat(divs) if divs else hs.new_zeros(0, dtype=torch.float32)


def _check(hs, ws, ht, wt, beta):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if wt.shape[0] < ws.shape[0]:
        raise ValueError(f"the teacher's head has {wt.shape[0]} rows, fewer than the student's {ws.shape[0]}")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"{hs.shape[0]} student rows against {ht.shape[0]} teacher rows")


def token_divergence_reference(hs, ws, ht, wt, beta, temperature=1.0, softcap_s=None, softcap_t=None,
                               chunk_tokens=None):
    """The torch path of `token_divergence` (same arguments and results), each chunk under activation checkpointing
    when a gradient is needed."""
    _check(hs, ws, ht, wt, beta)
    wt = wt[:ws.shape[0]]
    chunk = chunk_tokens or max(1, _chunk_tokens(ws.shape[0]) // 2)
    divs, ents = [], []
    for start in range(0, hs.shape[0], chunk):
        rows = slice(start, start + chunk)
        args = (hs[rows], ws, ht[rows], wt, beta, temperature, softcap_s, softcap_t)
        if torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad):
            div, ent = checkpoint(lambda *a: _chunk_terms(*a)[:2], *args, use_reentrant=False)
        else:
            div, ent = _chunk_terms(*args)[:2]
        divs.append(div)
        ents.append(ent.detach())
    if not divs:
        empty = hs.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(divs), torch.cat(ents)


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t, chunk):
        """As token_divergence: (divergences (N,), entropies (N,)), fp32."""
        ctx.set_materialize_grads(False)
        div = torch.empty(hs.shape[0], dtype=torch.float32, device=hs.device)
        ent = torch.empty_like(div)
        for start in range(0, hs.shape[0], chunk):
            rows = slice(start, start + chunk)
            div[rows], ent[rows] = _chunk_terms(hs[rows], ws, ht[rows], wt, beta, temperature, softcap_s,
                                                softcap_t)[:2]
        ctx.save_for_backward(hs, ws, ht, wt, div)
        ctx.settings = (beta, temperature, softcap_s, softcap_t, chunk)
        ctx.mark_non_differentiable(ent)
        return div, ent

    @staticmethod
    def backward(ctx, grad_div, _grad_ent):
        """d divergences -> (d hs, d ws, None, ...): the closed-form gradient of the module docstring."""
        hs, ws, ht, wt, div = ctx.saved_tensors
        beta, temperature, softcap_s, softcap_t, chunk = ctx.settings
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_div is None or not (need_h or need_w):
            return (None,) * 9
        w = ws.to(hs.dtype)
        grad_h = torch.zeros_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        for start in range(0, hs.shape[0], chunk):
            rows = slice(start, start + chunk)
            _, _, lps, lpt, lm, ts = _chunk_terms(hs[rows], ws, ht[rows], wt, beta, temperature, softcap_s,
                                                  softcap_t)
            ps = lps.exp()
            if beta == 0.0:
                g = ps - lpt.exp()
            elif beta == 1.0:
                g = ps * (lps - lpt - div[rows, None])
            else:
                a = lps - lm
                g = (1 - beta) * ps * (a - (ps * a).sum(-1, keepdim=True))
            g = g * (grad_div[rows].float()[:, None] / temperature)
            if ts is not None:
                g = g * (1.0 - ts * ts)
            g = g.to(hs.dtype)
            if need_h:
                grad_h[rows] = g @ w
            if need_w:
                grad_w += (g.t() @ hs[rows]).float()
        return grad_h, grad_w.to(ws.dtype) if grad_w is not None else None, None, None, None, None, None, None, None


def token_divergence(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, beta: float,
                     temperature: float = 1.0, softcap_s: float | None = None, softcap_t: float | None = None,
                     chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student-teacher divergence of each token (module docstring; TRL 1.16 DistillationTrainer's loss terms).

    Args:
        hs: (N, H_s) the student's hidden states at the N scored positions, as its LM head takes them; ws: (V_s, H_s)
            the student's head (differentiable).
        ht: (N, H_t) the teacher's hidden states at the same positions; wt: (V_t, H_t) its head, V_t >= V_s (rows past
            the student's vocabulary are left out, as TRL does). No gradient reaches them.
        beta: 0 (forward KL), 1 (reverse KL) or between (generalized JSD). temperature: both models' logits are
            divided by it. softcap_s / softcap_t: each model's final logit softcap (Gemma 2), or None.
        chunk_tokens: tokens per chunk (default: half the loss's chunk for this vocabulary).
    Returns: (divergences (N,) fp32, differentiable in hs and ws; the student's entropies (N,) fp32, nats, no
        gradient).
    Raises: ValueError for beta outside [0, 1], a teacher head with fewer rows than the student's, or N that differ.
    """
    _check(hs, ws, ht, wt, beta)
    chunk = chunk_tokens or max(1, _chunk_tokens(ws.shape[0]) // 2)
    wants_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
    if kernel_choice() == "torch" or not wants_grad:
        return token_divergence_reference(hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t, chunk)
    return _FusedDivergence.apply(hs, ws, ht.detach(), wt[:ws.shape[0]].detach(), beta, temperature, softcap_s,
                                  softcap_t, chunk)
