"""The LM head read from pinned host memory in tiles of vocabulary rows (`offload_lm_head`).

A frozen (V, H) head kept on the host never exists whole on the GPU: each function below copies it over in tiles
of `TILE_ROWS` rows (double-buffered on a side stream, so one tile's copy overlaps the previous tile's GEMMs) and
consumes every tile once per pass. The copy bounds the speed: ~1.5 GB per pass for Qwen2.5-14B's head, about 30 ms
over PCIe Gen5.

- `streamed_cross_entropy`: the training loss in ONE pass per chunk of tokens. A tile's logits only exist while
  it is read, so the softmax is online (the running max and sum of Milakov & Gimelshein 2018, "Online normalizer
  calculation for softmax", as flash attention uses them), and the gradient d(loss)/d(hidden) = sum_v p_v W_v -
  W_y is accumulated with it: acc is rescaled by exp(m_old - m_new) whenever the running max grows, and divided by
  the final sum at the end. Gemma 2's final softcap multiplies each term by its derivative 1 - tanh^2.
- `streamed_token_logprobs`: log p(y) = z_y - logsumexp(z), one pass forward and one in backward (the gradient
  reaching each log-prob is only known then).
- `streamed_logits`: plain logits, tile by tile into the output.

Logits are the 16-bit GEMM's (as cross_entropy.py and transformers form them) and the softmax math is fp32; each
tile's p @ W_tile product is a 16-bit GEMM accumulated in fp32 across tiles. On a CPU the "copies" are slices, so
the same code runs in the tests.
"""
from __future__ import annotations

import torch

from fasttune.constants import IGNORE_INDEX
from fasttune.kernels.dispatch import side_stream

TILE_ROWS = 8192          # vocab rows per copied tile: 84 MB at hidden 5120 in bf16
CHUNK_BYTES = 1 << 27     # fp32 logits of one (tokens x tile) block: 4096 tokens at 8192 rows


def head_tiles(weight: torch.Tensor, device: torch.device, dtype: torch.dtype, rows: int = TILE_ROWS):
    """Yield (start, tile) for consecutive row blocks of weight (V, H), each on `device` in `dtype`. From pinned
    host memory to CUDA the next tile's copy runs on a side stream while the caller computes on the current one."""
    v = weight.shape[0]
    if not (device.type == "cuda" and weight.device.type == "cpu"):
        for start in range(0, v, rows):
            yield start, weight[start:start + rows].to(device=device, dtype=dtype)
        return
    main = torch.cuda.current_stream(device)
    side = side_stream(device)

    def fetch(start):
        """Start copying the tile of `rows` rows from `start` on the side stream -> (tile, its copy's event). The tile
        is the main stream's memory (as in models/offload.py's fetch: the side stream keeps no cache of its own), so
        the copy first waits for the main stream's queued work, which may still use that memory."""
        source = weight[start:start + rows]
        tile = torch.empty(source.shape, dtype=source.dtype, device=device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            tile.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return tile, done

    pending = fetch(0)
    for start in range(0, v, rows):
        tile, done = pending
        main.wait_event(done)
        if start + rows < v:
            pending = fetch(start + rows)
        yield start, tile.to(dtype)


def _chunk_tokens(rows: int) -> int:
    return max(256, CHUNK_BYTES // (4 * rows))


def _math_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)  # fp32; fp64 stays fp64 (the tests' exact oracle)


def _softcapped(z: torch.Tensor, softcap: float | None):
    """(capped logits, d capped / d raw) in fp32; the derivative is None without a softcap."""
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, 1.0 - t * t


def _online_step(m: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    """One tile z (N, rows) of the online softmax: (new running max, new running sum, the factor exp(m_old - m_new)
    that rescales what was summed before (0 on the first tile, where m = -inf), exp(z - m_new))."""
    m_new = torch.maximum(m, z.amax(1))
    rescale = torch.exp(m - m_new)
    p = torch.exp(z - m_new[:, None])
    return m_new, s * rescale + p.sum(1), rescale, p


def _in_tile(y: torch.Tensor, start: int, rows: int):
    """(whether each label falls in the tile of `rows` rows from `start`, its column there, clamped so that rows
    whose label lies elsewhere still index safely)."""
    return (y >= start) & (y < start + rows), (y - start).clamp(0, rows - 1)


class _StreamedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, stats):
        """hidden (N, H), weight (V, H), labels (N,), stats ((2,) or None, see _ce_pass) -> per-token losses (N,)
        fp32; d loss / d hidden is formed here, chunk by chunk, and saved."""
        n, chunk = hidden.shape[0], _chunk_tokens(TILE_ROWS)
        losses = torch.zeros(n, dtype=_math_dtype(hidden), device=hidden.device)
        grad_h = torch.zeros_like(hidden)
        for c0 in range(0, n, chunk):
            rows = slice(c0, c0 + chunk)
            losses[rows], grad_h[rows] = _ce_pass(hidden[rows], weight, labels[rows], softcap, stats)
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_out):
        """grad_out (N,) -> (the saved d loss / d hidden scaled per row, None for the rest)."""
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None


def _ce_pass(h, weight, y, softcap, stats=None):
    """One pass over the head for the tokens h (N, H): (per-token loss (N,) fp32, d loss / d h (N, H)); stats: a (2,)
    fp32 tensor that [entropy sum, first-argmax hits] of the labelled rows is added to (cross_entropy.token_stats)."""
    n, dev, f = h.shape[0], h.device, _math_dtype(h)
    valid = y != IGNORE_INDEX
    m = torch.full((n,), float("-inf"), dtype=f, device=dev)
    s = torch.zeros(n, dtype=f, device=dev)
    acc = torch.zeros(h.shape, dtype=f, device=dev)
    z_y = torch.zeros(n, dtype=f, device=dev)
    target = torch.zeros(h.shape, dtype=f, device=dev)  # d_y * W_y, picked up in the tile holding y
    q = torch.zeros(n, dtype=f, device=dev)  # sum of exp(z - m) (m - z), for the entropy (see _logit_pass)
    before = torch.full((n,), float("-inf"), dtype=f, device=dev)  # the largest logit left of the label's column
    for start, tile in head_tiles(weight, dev, h.dtype):
        z, dz = _softcapped((h @ tile.t()).to(f), softcap)
        here, col = _in_tile(y, start, tile.shape[0])
        here = here & valid
        z_y = torch.where(here, z.gather(1, col[:, None]).squeeze(1), z_y)
        w_y = tile.index_select(0, col).to(f)
        if dz is not None:
            w_y = w_y * dz.gather(1, col[:, None])
        target = torch.where(here[:, None], w_y, target)
        m_old, s_old = m, s
        m, s, rescale, p = _online_step(m, s, z)
        if stats is not None:
            q = torch.where(s_old > 0, rescale * (q + (m - m_old) * s_old), 0.0) + (p * (m[:, None] - z)).sum(1)
            left = torch.arange(start, start + tile.shape[0], device=dev)[None, :] < y[:, None]
            before = torch.maximum(before, torch.where(left, z, float("-inf")).amax(1))
        if dz is not None:
            p = p * dz
        acc = acc * rescale[:, None] + (p.to(h.dtype) @ tile).to(f)
    loss = torch.where(valid, m + torch.log(s) - z_y, 0.0)
    grad = torch.where(valid[:, None], acc / s[:, None] - target, 0.0)
    if stats is not None:
        entropy = torch.where(valid, torch.log(s) + q / s, 0.0)
        hits = valid & (z_y >= m) & (z_y > before)
        stats += torch.stack([entropy.sum(), hits.sum().to(entropy.dtype)]).to(stats.dtype)
    return loss, grad.to(h.dtype)


def streamed_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           softcap: float | None = None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """hidden (N, H) 16/32-bit on the compute device, weight (V, H) frozen (pinned host memory, or anywhere),
    labels (N,) int64 already shifted (IGNORE_INDEX = no loss) -> the fp32 loss sum, as
    cross_entropy.chunked_linear_cross_entropy gives it (and its `stats`). d(loss)/d(hidden) is computed in the
    forward pass; the weight gets no gradient."""
    return _StreamedCrossEntropy.apply(hidden, weight, labels, softcap, stats).sum().float()


def _logit_pass(h, weight, softcap, temperature, y=None, lse=None, go=None, ent=None, go_ent=None,
                entropy=False, extras=None):
    """Without lse: (logsumexp (N,), z_y (N,), entropy (N,) or None) of z = softcap(h W^T) / temperature, the entropy
    with entropy=True, and `extras` (N, 3) filled with token_logprobs.logit_extras' columns when given. With lse and
    the incoming gradient go (N,) (and go_ent (N,) for the entropies `ent` (N,)):
    d(sum go * log p_y + sum go_ent * H) / d h."""
    n, dev, f = h.shape[0], h.device, _math_dtype(h)
    m = torch.full((n,), float("-inf"), dtype=f, device=dev)
    s = torch.zeros(n, dtype=f, device=dev)
    # running sum of exp(z - m) (m - z): non-negative terms, so the entropy log(s) + q / s has no cancellation
    q = torch.zeros(n, dtype=f, device=dev) if entropy else None
    z_y = torch.zeros(n, dtype=f, device=dev)
    grad = torch.zeros(h.shape, dtype=f, device=dev) if lse is not None else None
    if extras is not None:  # sum of z, the largest z before the label's column, online logsumexp of 2 z
        z_sum, before = torch.zeros(n, dtype=f, device=dev), torch.full((n,), float("-inf"), dtype=f, device=dev)
        m2, s2 = torch.full((n,), float("-inf"), dtype=f, device=dev), torch.zeros(n, dtype=f, device=dev)
    for start, tile in head_tiles(weight, dev, h.dtype):
        z, dz = _softcapped((h @ tile.t()).to(f), softcap)
        z = z / temperature
        here, col = _in_tile(y, start, tile.shape[0])
        if lse is None:
            z_y = torch.where(here, z.gather(1, col[:, None]).squeeze(1), z_y)
            m_old, s_old = m, s
            m, s, rescale, p = _online_step(m, s, z)
            if extras is not None:
                z_sum += z.sum(1)
                earlier = torch.arange(start, start + z.shape[1], device=dev)[None, :] < y[:, None]
                before = torch.maximum(before, torch.where(earlier, z, float("-inf")).amax(1))
                m2, s2, _, _ = _online_step(m2, s2, 2 * z)
            if q is not None:  # the terms so far, moved to the new max: e^(z-m') (m'-z) = r e^(z-m) ((m-z) + (m'-m))
                q = torch.where(s_old > 0, rescale * (q + (m - m_old) * s_old), 0.0) + (p * (m[:, None] - z)).sum(1)
            continue
        # d log p_y / d z_v = onehot - softmax, times go; d H / d z_v = -p_v (z_v - E_p[z]), E_p[z] = lse - H;
        # then through 1/T and the softcap
        p = torch.exp(z - lse[:, None])
        g = -p * go[:, None]
        if go_ent is not None:
            g = g - p * (z - (lse - ent)[:, None]) * go_ent[:, None]
        g.scatter_add_(1, col[:, None], torch.where(here, go, 0.0)[:, None])
        g = g / temperature
        if dz is not None:
            g = g * dz
        grad += (g.to(h.dtype) @ tile).to(f)
    if lse is not None:
        return grad.to(h.dtype)
    lse = m + torch.log(s)
    if extras is not None:
        top1 = (z_y >= m) & (z_y > before)  # the first argmax, as torch.argmax picks it
        extras.copy_(torch.stack([z_sum / weight.shape[0], top1.to(f), m2 + torch.log(s2) - 2 * lse], 1))
    return lse, z_y, (torch.log(s) + q / s if q is not None else None)


class _StreamedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, temperature, entropy, extras=None):
        """(log-probs (N,), entropies (N,); zeros unless `entropy`), fp32; fills `extras` (N, 3) when given."""
        ctx.set_materialize_grads(False)
        lse, z_y, ent = _logit_pass(hidden, weight, softcap, temperature, labels, entropy=entropy, extras=extras)
        ent = torch.zeros_like(lse) if ent is None else ent
        ctx.save_for_backward(hidden, labels, lse, ent)
        ctx.weight, ctx.softcap, ctx.temperature = weight, softcap, temperature
        return (z_y - lse).float(), ent.float()

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        """(d log-probs or None, d entropies or None) -> (d hidden, None, ...)."""
        hidden, labels, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_out is None and grad_ent is None):
            return None, None, None, None, None, None, None
        go = torch.zeros_like(lse) if grad_out is None else grad_out.to(lse.dtype)
        grad = _logit_pass(hidden, ctx.weight, ctx.softcap, ctx.temperature, labels, lse, go, ent,
                           None if grad_ent is None else grad_ent.to(lse.dtype))
        return grad, None, None, None, None, None, None


def streamed_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            softcap: float | None = None, temperature: float = 1.0, entropy: bool = False,
                            extras: torch.Tensor | None = None):
    """log p(labels | hidden) (N,) fp32 through a frozen head weight (V, H) streamed in tiles (see module doc); the
    same values as kernels.token_logprobs.token_logprobs (and with entropy=True the same (log-probs, entropies); with
    extras (N, 3) the same extras), with gradients for hidden only."""
    logps, ent = _StreamedTokenLogprobs.apply(hidden, weight, labels, softcap, temperature, entropy, extras)
    return (logps, ent) if entropy else logps


def streamed_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """hidden (..., H) -> logits (..., V) in hidden's dtype, the head streamed in tiles; Gemma 2's softcap applied
    as cross_entropy.logits_from_hidden does."""
    out = hidden.new_empty(*hidden.shape[:-1], weight.shape[0])
    for start, tile in head_tiles(weight, hidden.device, hidden.dtype):
        out[..., start:start + tile.shape[0]] = hidden @ tile.t()
    if softcap:
        out = torch.tanh(out / softcap) * softcap
    return out
