"""Cross-entropy fused with the lm_head, in chunks of tokens so the (tokens x vocab) logits never exist at once.

Each chunk's logits are recomputed in backward (torch.utils.checkpoint), so peak memory holds one chunk.
Returns the SUM of target-token losses: the trainer divides by the token count of the whole accumulated batch.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def logits_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    logits = hidden @ weight.to(hidden.dtype).t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss_sum(hidden, weight, labels, softcap):
    logits = logits_from_hidden(hidden, weight, softcap).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None = None,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,) already shifted; returns the fp32 loss sum over labels != -100."""
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]  # only target rows reach the lm_head
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, h, weight, y, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, y, softcap)
    return total
