"""Per-token log-probabilities of given tokens through the lm_head, in chunks of tokens (RL objectives: GRPO),
and optionally the entropy of each token's distribution.

log p(y | h) = z_y - logsumexp(z) with z = softcap(h @ W^T) / temperature, i.e. minus the per-token cross-entropy
of `cross_entropy.py`; the entropy H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v (TRL's
`entropy_from_logits` of the temperature-scaled logits). Unlike that loss, the gradient that reaches each token's
log-prob is only known in backward (GRPO's clipped ratio depends on the log-prob itself), so it cannot be folded
into the forward pass:
- reference: plain log_softmax + gather of each chunk under torch.utils.checkpoint.
- fused (default): the forward keeps only the per-token logsumexp (and entropy), N floats each; backward recomputes
  each chunk's logits and applies d logp / d z = onehot(y) - softmax(z) and d H / d z = -p * (z - E_p[z]) with
  E_p[z] = logsumexp - H, so the (tokens x vocab) logits never exist at once and no autograd graph over them is
  stored.

`extras` (an (N, 3) fp32 tensor, filled without gradient): per token the EXTRAS that TRL's fused LM head gives DPO
(its chunked_logprob outputs of those names): the mean logit over the vocabulary, whether the label is the first
argmax, and log sum_v p_v^2 (WPO's weights), from the same chunk logits.

fp32=True (TRL's cast_lm_head_to_fp32, ScaleRL's recipe): the head's product is taken in fp32 from the 16-bit hidden
states and weights (exact in fp32), where the default rounds each logit to the hidden dtype first as a 16-bit
nn.Linear does (a bf16 logit near 20 is off by up to 0.06); backward multiplies the fp32 logit gradients by the
16-bit weights and hidden states in fp32 (fp32_mixed_product). On CUDA no fp32 copy of the weight is made.
"""

import torch
from torch.utils.checkpoint import checkpoint

from fasttune.kernels.cross_entropy import _chunk_tokens, fp32_mixed_product, fp32_product  # the loss's chunk size
from fasttune.kernels.dispatch import kernel_choice, use_triton
from fasttune.kernels.logit_stats import STATS, logit_row_stats, logit_row_stats_reference


def _scaled_logits(hidden, weight, softcap, temperature, fp32=False):
    """fp32 logits after the final softcap (Gemma 2) and the sampling temperature, as sampling sees them; fp32: the
    head's product in fp32 (fp32_product), else rounded to the hidden dtype as a 16-bit nn.Linear rounds it."""
    z = fp32_product(hidden, weight) if fp32 else (hidden @ weight.to(hidden.dtype).t()).float()
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    return z / temperature, t


EXTRAS = STATS[3:]  # the columns of `extras`: mean_logits, is_top1, log_sum_sq_probs (TRL's names)


@torch.no_grad()
def logit_extras(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows, 3) fp32 (fp64 for fp64 z), the EXTRAS of scaled logits z (rows, V) at labels (rows,): mean over the V
    logits; 1.0 where the label is the first argmax (a tie with an earlier column is a miss, as TRL counts);
    log sum_v softmax(z)_v^2 = logsumexp(2 z) - 2 logsumexp(z) (kernels/logit_stats.py's columns)."""
    return logit_row_stats_reference(z, labels, extras=True)[:, 3:]


def _chunk_logprobs(hidden, weight, labels, softcap, temperature, entropy, fp32=False, extras=False):
    """The chunk's log-probs; with entropy, (log-probs, entropies); with extras, (log-probs, entropies or None,
    extras): returned, not written, as the chunk may run under checkpoint."""
    z, _ = _scaled_logits(hidden, weight, softcap, temperature, fp32)
    logp = z.log_softmax(-1)
    picked = logp.gather(1, labels[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1) if entropy else None
    if extras:
        return picked, ent, logit_extras(z.detach(), labels)
    return (picked, ent) if entropy else picked


def token_logprobs_reference(hidden, weight, labels, softcap=None, temperature=1.0, chunk_tokens=None,
                             entropy=False, fp32=False, extras=None):
    """The torch path of `token_logprobs` (same arguments and results): log_softmax + gather (and the entropy) per
    chunk of `chunk_tokens` rows, each under activation checkpointing when a gradient is needed."""
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        args = (h, weight, y, softcap, temperature, entropy, fp32, extras is not None)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            part = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            part = _chunk_logprobs(*args)
        if extras is not None:
            extras[start:start + chunk] = part[2]
            part = part[:2] if entropy else part[0]
        out.append(part)
    if not out:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if entropy else empty
    if entropy:
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return torch.cat(out)


class _FusedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, temperature, chunk, entropy, fp32, extras=None):
        """As token_logprobs: returns (log-probs (N,), entropies (N,); zeros unless `entropy`), both fp32; fills
        `extras` (N, 3) when given."""
        ctx.set_materialize_grads(False)  # an output nothing differentiates (the entropy, most often) gets None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        math = torch.promote_types(hidden.dtype, torch.float32)  # (fp64 inputs: the tests' exact oracle)
        lse = torch.empty(hidden.shape[0], dtype=math, device=hidden.device)
        ent = torch.zeros_like(lse)
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            # the head's product as _scaled_logits forms it, its statistics in one pass (kernels/logit_stats.py)
            raw = fp32_product(hidden[rows], weight) if fp32 else hidden[rows] @ w.t()
            stats = logit_row_stats(raw, labels[rows], softcap, temperature, entropy, extras is not None)
            lse[rows] = stats[:, 0]
            out[rows] = stats[:, 1] - stats[:, 0]
            if entropy:
                ent[rows] = stats[:, 2]
            if extras is not None:
                extras[rows] = stats[:, 3:]
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.softcap, ctx.temperature, ctx.chunk, ctx.fp32 = softcap, temperature, chunk, fp32
        return out, ent.float()

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        """(d log-probs, d entropies or None) -> (d hidden, d weight, None, ...)."""
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_out is None and grad_ent is None:
            return None, None, None, None, None, None, None, None, None
        w = weight.to(hidden.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            hc, yc = hidden[rows], labels[rows]
            go = grad_out[rows].float() if grad_out is not None else torch.zeros_like(lse[rows])
            z, t = _scaled_logits(hc, weight, ctx.softcap, ctx.temperature, ctx.fp32)
            if grad_ent is None:
                # d logp / dz = onehot - softmax; times the incoming grad, then back through 1/T and the softcap.
                g = z.sub_(lse[rows, None]).exp_().mul_(-go[:, None])
            else:
                # + d H / dz = -p (z - E_p[z]), E_p[z] = lse - H: g = p * (-go - gH * (z - E_p[z]))
                d = z.sub_((lse[rows] - ent[rows])[:, None])  # z - E_p[z]
                p = (d - ent[rows, None]).exp_()  # z - lse = (z - E_p[z]) - H
                g = d.mul_(-grad_ent[rows].float()[:, None]).sub_(go[:, None]).mul_(p)
            g[torch.arange(g.shape[0], device=g.device), yc] += go
            g.div_(ctx.temperature)
            if t is not None:
                g.mul_(1.0 - t * t)
            if ctx.fp32:  # fp32 logit gradients against the 16-bit weights / hidden states, no fp32 copies
                if need_h:
                    grad_h[rows] = fp32_mixed_product(g, weight).to(hidden.dtype)
                if need_w:
                    grad_w += fp32_mixed_product(g.t(), hc).float()
                continue
            g = g.to(w.dtype)
            if need_h:
                grad_h[rows] = g @ w
            if need_w:
                grad_w += (g.t() @ hc).float()
        gw = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, gw, None, None, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None = None,
                   temperature: float = 1.0, chunk_tokens: int | None = None, entropy: bool = False,
                   fp32: bool = False, extras: torch.Tensor | None = None):
    """hidden (N, H) at the positions that predict `labels` (N,), weight (V, H) -> fp32 log-probs (N,) of the labels
    under softmax(softcap(hidden @ weight^T) / temperature); with entropy=True, (log-probs, entropies (N,) fp32 in
    nats), both differentiable (GRPO's entropy bonus back-propagates the entropy). fp32=True: the head's product in
    fp32 (see the module docstring), else rounded to the hidden dtype. extras: an (N, 3) fp32 tensor that gets each
    token's EXTRAS (no gradient; see logit_extras)."""
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # Without a gradient the fused forward still pays on the GPU: one pass of the row kernel over 16-bit logits
    # instead of log_softmax over an fp32 copy (reference log-probs of DPO / KTO / GRPO).
    if kernel_choice() == "torch" or not (wants_grad or use_triton(hidden)):
        return token_logprobs_reference(hidden, weight, labels, softcap, temperature, chunk, entropy, fp32, extras)
    logps, ent = _FusedTokenLogprobs.apply(hidden, weight, labels, softcap, temperature, chunk, entropy, fp32,
                                           extras)
    return (logps, ent) if entropy else logps
