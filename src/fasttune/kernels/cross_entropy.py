"""Cross-entropy fused with the lm_head, in chunks of tokens so the (tokens x vocab) logits never exist at once.

Both paths return the SUM of target-token losses (the trainer divides by the token count of the whole
accumulated batch) and only send target rows through the lm_head.
- reference: each chunk under torch.utils.checkpoint (its logits are recomputed in backward).
- fused (default): the gradient is computed in the forward pass, chunk by chunk (softmax - one-hot, times the
  softcap derivative), and multiplied into d(hidden) and d(lm_head) right away, so backward only scales by the
  incoming gradient: no logits are kept and no lm_head matmul is redone. d(lm_head) accumulates in fp32.
"""
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# fp32 logits per chunk. 256 MiB (~520 tokens at a 128K vocab) keeps the matmuls large while the chunk's logits,
# softmax and bf16 gradient stay well under 1 GiB at the training peak.
CHUNK_BYTES = 1 << 28


def logits_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    logits = hidden @ weight.to(hidden.dtype).t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_tokens(vocab: int) -> int:
    return max(256, min(8192, CHUNK_BYTES // (4 * vocab)))


def _chunk_loss_sum(hidden, weight, labels, softcap):
    logits = logits_from_hidden(hidden, weight, softcap).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy_reference(hidden, weight, labels, softcap=None, chunk_tokens=None):
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, h, weight, y, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, y, softcap)
    return total


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk):
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        h, y = hidden.index_select(0, keep), labels.index_select(0, keep)
        w = weight.to(hidden.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], y[start:start + chunk]
            logits = (hc @ w.t()).float()
            if softcap:
                t = torch.tanh(logits / softcap)
                logits = t * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
            if softcap:
                g.mul_(1.0 - t * t)
            g = g.to(hidden.dtype)
            if need_h:
                grad_h.index_copy_(0, keep[start:start + chunk], g @ w)
            if need_w:
                grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 softcap: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,) already shifted; returns the fp32 loss sum over labels != -100."""
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if os.environ.get("FASTTUNE_KERNELS", "").lower() == "torch" or not wants_grad:
        return linear_cross_entropy_reference(hidden, weight, labels, softcap, chunk)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, softcap, chunk)
