"""Cross-entropy fused with the lm_head, in chunks of tokens so the (tokens x vocab) logits never exist at once.

Both paths return the SUM of target-token losses (the trainer divides by the token count of the whole
accumulated batch) and only send target rows through the lm_head.
- reference: each chunk under torch.utils.checkpoint (its logits are recomputed in backward).
- fused (default): the gradient is computed in the forward pass, chunk by chunk (softmax - one-hot, times the
  softcap derivative), and multiplied into d(hidden) and d(lm_head) right away, so backward only scales by the
  incoming gradient: no logits are kept and no lm_head matmul is redone. d(lm_head) accumulates in fp32.
  Per chunk, the lm_head GEMM gives 16-bit logits (as transformers does before its fp32 upcast); one Triton
  kernel turns them, in place, into that gradient and a per-row loss, computing in fp32.
`dft` (Dynamic Fine-Tuning) and `label_smoothing` (transformers' LabelSmoother) change each row's loss and gradient
alike on every path (see chunked_linear_cross_entropy).
With `stats` (a (2,) fp32 tensor) every path also adds, over the labelled rows, the entropy of each row's
distribution and the count of rows whose label is its first argmax: TRL's SFT metrics `entropy` and
`mean_token_accuracy` (TRL's fused LM head: a tie with an earlier token is not a top-1 hit), from the same logits.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fasttune.constants import IGNORE_INDEX
from fasttune.kernels.dispatch import HAVE_TRITON, kernel_choice, next_pow2, use_triton

# Logit bytes per chunk. 256 MiB (~520 tokens of fp32 logits at a 128K vocab) keeps the matmuls large while the
# chunk's logits, softmax and bf16 gradient stay well under 1 GiB at the training peak. The Triton path needs
# only the 16-bit logits buffer, so it counts 2 bytes a logit: twice the tokens, under the torch path's peak.
CHUNK_BYTES = 1 << 28
# Vocab block of the chunk kernel, at 8 warps (16 values a thread): ~80-95 registers, so 2-3 rows share an SM.
_CE_BLOCK = 4096


def fp32_product(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a (N, H) @ weight (V, H)^T -> (N, V) in fp32 (fp64 for fp64 inputs), accumulated in fp32 from the exact
    products of 16-bit values: on CUDA without a gradient to track, one 16-bit GEMM with an fp32 output (torch.mm's
    out_dtype, no fp32 copy of the weight), else a GEMM of fp32 copies."""
    tracked = torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad)
    if a.is_cuda and not tracked and a.dtype == weight.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm's out_dtype
            pass
    dtype = torch.promote_types(torch.promote_types(a.dtype, weight.dtype), torch.float32)
    return a.to(dtype) @ weight.to(dtype).t()


def fp32_mixed_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) fp32 @ b (K, N) 16-bit -> (M, N) fp32 without an fp32 copy of b: on CUDA a = hi + lo, each in b's
    dtype (hi = a rounded, lo = the rounding's residue), and hi @ b + lo @ b as two 16-bit GEMMs with fp32 outputs
    (torch.mm's out_dtype): the residue of the split is ~2^-16 of a (bf16) against fp32's 2^-24, far below the
    16-bit rounding the results get next. Elsewhere a @ b in a's dtype (at least fp32)."""
    if a.is_cuda and a.dtype == torch.float32 and b.dtype in (torch.bfloat16, torch.float16):
        try:
            hi = a.to(b.dtype)
            lo = (a - hi.float()).to(b.dtype)
            out = torch.mm(hi, b, out_dtype=torch.float32)
            return out.add_(torch.mm(lo, b, out_dtype=torch.float32))
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm's out_dtype
            pass
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(dtype)


def logits_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None,
                       fp32: bool = False) -> torch.Tensor:
    """hidden (..., H) @ weight (V, H)^T in hidden's dtype -> logits (..., V); fp32=True: the product in fp32
    (fp32_product; TRL's cast_lm_head_to_fp32). With softcap, Gemma 2's final logit softcapping
    tanh(logits / softcap) * softcap."""
    if fp32:
        logits = fp32_product(hidden.reshape(-1, hidden.shape[-1]), weight).view(*hidden.shape[:-1], -1)
    else:
        logits = hidden @ weight.to(hidden.dtype).t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_tokens(vocab: int, bytes_per_logit: int = 4) -> int:
    return max(256, min(8192, CHUNK_BYTES // (bytes_per_logit * vocab)))


@torch.no_grad()
def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2,) fp32 [sum of the entropies, count of first-argmax hits] over the rows of logits (rows, V) (final softcap
    applied) whose label (rows,) is not IGNORE_INDEX. torch.argmax returns the first maximum, as TRL counts."""
    z = logits.float()
    valid = labels != IGNORE_INDEX
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    hits = (z.argmax(-1) == labels) & valid
    return torch.stack([torch.where(valid, entropy, 0.0).sum(), hits.sum().float()])


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, dft: bool = False,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """The fp32 cross-entropy sum of logits (rows, V) against labels (rows,) (IGNORE_INDEX rows: 0); dft: each
    row's cross-entropy times its label's probability exp(-cross-entropy), detached (Dynamic Fine-Tuning, Wu et al.
    2025); label_smoothing e: each row's (1 - e) x cross-entropy + e x the mean over the V classes of -log p
    (torch's and transformers' LabelSmoother's definition). Differentiable: the torch paths' loss."""
    _check_variant(dft, label_smoothing)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none",
                         label_smoothing=label_smoothing)
    return (ce * torch.exp(-ce).detach()).sum() if dft else ce.sum()


def _check_variant(dft: bool, label_smoothing: float):
    if dft and label_smoothing:
        raise ValueError("dft and label_smoothing do not combine (SFTConfig refuses the pair).")


def _chunk_loss_sum(hidden, weight, labels, softcap, stats, dft=False, label_smoothing=0.0):
    logits = logits_from_hidden(hidden, weight, softcap).float()
    loss = cross_entropy_sum(logits, labels, dft, label_smoothing)
    return (loss, token_stats(logits, labels)) if stats else loss


def linear_cross_entropy_reference(hidden, weight, labels, softcap=None, chunk_tokens=None, stats=None, dft=False,
                                   label_smoothing=0.0):
    """The torch path of `chunked_linear_cross_entropy` (same arguments and fp32 loss sum): target rows only,
    `chunk_tokens` rows at a time (default: 256 MiB of fp32 logits), each chunk under activation checkpointing
    when a gradient is needed."""
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    want = stats is not None
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            # (the stats come from the first run only: the recompute's outputs are discarded)
            out = checkpoint(_chunk_loss_sum, h, weight, y, softcap, want, dft, label_smoothing, use_reentrant=False)
        else:
            out = _chunk_loss_sum(h, weight, y, softcap, want, dft, label_smoothing)
        if want:
            out, part = out
            stats += part
        total = total + out
    return total


def _ce_chunk_grad_reference(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                             stats: torch.Tensor | None = None, dft: bool = False,
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """Overwrite logits (rows, V) with d(loss)/d(logits) = softmax - onehot (times the softcap derivative) and
    return the loss sum (fp32; fp64 for fp64 logits); rows labelled IGNORE_INDEX get loss 0 and gradient 0. stats:
    a (2,) fp32 tensor that token_stats of these logits is added to. dft: each row's loss and gradient times its
    label's probability exp(-loss), a constant (Dynamic Fine-Tuning). label_smoothing e: the loss
    lse - (1 - e) z_label - e mean(z), whose gradient is softmax - (1 - e) onehot - e / V."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64 (the tests' exact oracle)
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if stats is not None:
        stats += token_stats(z, labels)
    valid = labels != IGNORE_INDEX
    y = labels.clamp_min(0)
    lse = torch.logsumexp(z, dim=-1)
    ce = torch.where(valid, lse - z.gather(1, y[:, None]).squeeze(1), 0.0)
    scale = torch.exp(-ce) * valid if dft else valid
    eps = label_smoothing
    if eps:
        ce = torch.where(valid, (1.0 - eps) * ce + eps * (lse - z.mean(-1)), 0.0)
    g = z.sub_(lse[:, None]).exp_()  # softmax, in place (z may alias fp32 logits: they are overwritten anyway)
    g[torch.arange(g.shape[0], device=g.device), y] -= 1.0 - eps
    if eps:
        g.sub_(eps / g.shape[1])
    if softcap:
        g.mul_(1.0 - t * t)
    logits.copy_(g.mul_(scale[:, None]))
    return (ce * scale).sum()


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _softcapped(x, softcap):
        t = 2.0 * tl.sigmoid(2.0 * (x / softcap)) - 1.0  # tanh: libdevice's does not run in the interpreter
        return t * softcap, t

    @triton.jit
    def _ce_chunk_kernel(logits_ptr, labels_ptr, loss_ptr, stats_ptr, n_cols, stride, softcap, SOFTCAP: tl.constexpr,
                         STATS: tl.constexpr, DFT: tl.constexpr, smoothing, SMOOTH: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows * V can pass 2**31 (256K vocab, 8K-token chunks)
        ptr = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        valid = (label >= 0) & (label < n_cols)  # IGNORE_INDEX (or a bad id): loss 0, gradient 0, no stray read
        cols = tl.arange(0, BLOCK)
        # pass 1: online max / sum-exp in fp32 (STATS: also q = sum exp(z - m) (m - z), non-negative terms, for the
        # entropy log(s) + q / s, and the largest logit before the label's column, for the first-argmax test)
        m = float("-inf")
        s = 0.0
        q = 0.0
        before = float("-inf")
        total = 0.0  # SMOOTH: the sum of the row's logits (label smoothing's mean)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z, _ = _softcapped(z, softcap)
            if SMOOTH:
                total += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            p = tl.exp(z - m_new)
            if STATS:
                q = tl.where(s > 0, tl.exp(m - m_new) * (q + (m_new - m) * s), 0.0) + \
                    tl.sum(tl.where(mask, p * (m_new - z), 0.0), axis=0)
                before = tl.maximum(before, tl.max(tl.where(start + cols < label, z, float("-inf")), axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(p, axis=0)
            m = m_new
        lse = m + tl.log(s)
        zy = tl.load(ptr + tl.where(valid, label, 0)).to(tl.float32)
        if SOFTCAP:
            zy, _ = _softcapped(zy, softcap)
        # DFT: the row's loss and gradient times its label's probability exp(-loss), a constant
        weight = 1.0
        if DFT:
            weight = tl.exp(zy - lse)
        # label smoothing e: lse - (1 - e) z_label - e mean(z); its gradient softmax - (1 - e) onehot - e / V
        hit = 1.0
        floor = 0.0
        row_loss = lse - zy
        if SMOOTH:
            hit = 1.0 - smoothing
            floor = smoothing / n_cols
            row_loss = lse - hit * zy - smoothing * (total / n_cols)
        tl.store(loss_ptr + row, tl.where(valid, row_loss * weight, 0.0))
        if STATS:
            tl.store(stats_ptr + 2 * row, tl.where(valid, tl.log(s) + q / s, 0.0))
            tl.store(stats_ptr + 2 * row + 1, tl.where(valid & (zy >= m) & (zy > before), 1.0, 0.0))
        # pass 2: the gradient, over the logits it was computed from
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z, t = _softcapped(x, softcap)
            else:
                z = x
            g = (tl.exp(z - lse) - tl.where(start + cols == label, hit, 0.0) - floor) * weight
            if SOFTCAP:
                g = g * (1.0 - t * t)
            g = tl.where(valid, g, 0.0)
            tl.store(ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _ce_chunk_grad_triton(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                          block: int | None = None, stats: torch.Tensor | None = None,
                          dft: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "the kernel walks contiguous vocab rows"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss.sum()
    per_row = torch.empty(rows, 2, dtype=torch.float32, device=logits.device) if stats is not None else loss
    block = block or min(_CE_BLOCK, next_pow2(vocab))
    _ce_chunk_kernel[(rows,)](logits, labels.contiguous(), loss, per_row, vocab, logits.stride(0),
                              float(softcap or 1.0), SOFTCAP=bool(softcap), STATS=stats is not None, DFT=dft,
                              smoothing=float(label_smoothing), SMOOTH=bool(label_smoothing), BLOCK=block,
                              num_warps=min(8, max(1, block // 512)))
    if stats is not None:
        stats += per_row.sum(0)
    return loss.sum()


def _ce_chunk_grad_(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                    stats: torch.Tensor | None = None, dft: bool = False,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """The chunk's fp32 loss sum; logits become their gradient in place (see `_ce_chunk_grad_reference`); stats:
    see the module doc; dft: Dynamic Fine-Tuning's weighting; label_smoothing: transformers' LabelSmoother's."""
    if use_triton(logits) and logits.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return _ce_chunk_grad_triton(logits, labels, softcap, stats=stats, dft=dft, label_smoothing=label_smoothing)
    return _ce_chunk_grad_reference(logits, labels, softcap, stats, dft, label_smoothing)


GRAD_W_TILE_ROWS = 8192  # vocab rows of d(lm_head) per 16-bit product: its temporaries stay ~200 MiB at hidden 4096


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc (fp32) += a @ b in tiles of rows: a whole-vocab 16-bit product plus its fp32 copy would be ~3 GiB at
    a 128K vocab and hidden 4096 (a trainable lm_head)."""
    for start in range(0, a.shape[0], GRAD_W_TILE_ROWS):
        acc[start:start + GRAD_W_TILE_ROWS] += (a[start:start + GRAD_W_TILE_ROWS] @ b).float()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The loss sum of hidden @ weight^T against labels, with both gradients formed in forward, chunk by chunk
    (the logits of one chunk are overwritten by their gradient); backward only scales them by grad_out."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk, compact, stats=None, dft=False, label_smoothing=0.0):
        """hidden (N, H), weight (V, H), labels (N,) int64; chunk: rows per GEMM; compact: see
        chunked_linear_cross_entropy; stats: a (2,) fp32 tensor the chunks' token_stats are added to, or None.
        Returns the fp32 () loss sum; saves d(sum)/d(hidden) (hidden's dtype) and d(sum)/d(weight) (fp32)."""
        if compact:  # only the rows with a label: no work on padding or prompts (a host sync: dynamic shape)
            keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            h, y = hidden.index_select(0, keep), labels.index_select(0, keep)
        else:  # every row, static shapes (CUDA graph capture); ignored rows give 0 loss and 0 gradient
            keep, h, y = None, hidden, labels
        w = weight.to(hidden.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], y[start:start + chunk]
            g = hc @ w.t()  # logits in the activation dtype, overwritten by their gradient
            total += _ce_chunk_grad_(g, yc, softcap, stats, dft, label_smoothing)
            if need_h and keep is None:
                torch.matmul(g, w, out=grad_h[start:start + chunk])
            elif need_h:
                grad_h.index_copy_(0, keep[start:start + chunk], g @ w)
            if need_w:
                _accumulate_fp32(grad_w, g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        """grad_out () -> the saved gradients times grad_out (weight's in its dtype), None for the rest."""
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 softcap: float | None = None, chunk_tokens: int | None = None,
                                 compact: bool | None = None, stats: torch.Tensor | None = None,
                                 dft: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,) already shifted; returns the fp32 loss sum over labels != -100.

    compact: True drops the rows without a label before the GEMMs (less work when many are ignored, at the cost of
    one host sync for their count); False keeps every row (static shapes, as a CUDA graph capture needs); None: True
    unless the current CUDA stream is being captured. stats: a (2,) fp32 tensor on hidden's device that gets
    [sum of the labelled rows' entropies, count of them whose label is the first argmax] added (no gradient).
    dft: Dynamic Fine-Tuning (Wu et al. 2025; TRL's SFT loss_type="dft"): each label's cross-entropy times its
    probability exp(-cross-entropy), detached. label_smoothing e (transformers' label_smoothing_factor, its
    LabelSmoother; torch's cross_entropy(label_smoothing=e)): each label's loss (1 - e) x cross-entropy + e x the
    mean over the V logit columns of -log p. Raises ValueError for dft with label_smoothing."""
    _check_variant(dft, label_smoothing)
    if compact is None:
        compact = not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if kernel_choice() == "torch" or not wants_grad:
        chunk = chunk_tokens or _chunk_tokens(weight.shape[0])
        return linear_cross_entropy_reference(hidden, weight, labels, softcap, chunk, stats, dft, label_smoothing)
    # the Triton chunk math keeps only the GEMM's logits buffer, so its chunks count that buffer's bytes
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0], hidden.element_size() if use_triton(hidden) else 4)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, softcap, chunk, compact, stats, dft,
                                          label_smoothing)
