"""Attention over (B, H, T, D) queries, keys and values for the decoder's layers: SDPA (GQA, causal or masked,
with the forward's results kept for recompute under "offload"), Gemma 2's softcapped scores (eager), and gpt-oss's
sink logits as one extra key column; each beside the exact eager path it must equal."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from fasttune.models.offload import kept_attention
from fasttune.models.varlen import FLASH_MAX_HEAD_DIM
from fasttune.models.window_attention import SlidingWindow, banded_attention, sliding_window_attention


# cuDNN's SDPA kernel (what torch picks for 16-bit causal attention on Hopper) builds an execution plan for every new
# sequence length: 0.2-0.3 s a length on an H200, measured (Llama-3.2-1B shape, LoRA, 2 x 777 tokens: 317 ms a step
# at a new length, 108 ms at a seen one; 113 / 112 with SDPA's flash kernel). Padded batches of real data bring a new
# length almost every step, so causal rows are padded to a multiple of this: at most seq / 64 plans. Rows longer
# than PADDED_ROWS_MAX are left as they are: there a plan costs a few percent of a step, while the padded copies of
# q, k and v would add to the peak (1.5 GiB a layer at 131K tokens on an 8B shape).
SHAPE_STEP = 64
PADDED_ROWS_MAX = 16384


def shape_padding(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many zero positions plain causal self-attention over q / k (B, H, T, D), T == S, gets appended on the GPU
    in 16 bits so that T becomes a multiple of SHAPE_STEP (0 elsewhere, and past PADDED_ROWS_MAX tokens). The real
    queries never see the appended keys (they come after them) and the appended queries' outputs are dropped, so
    values and gradients are those of the unpadded call."""
    t = q.shape[2]
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or t != k.shape[2] or not 1 < t <= \
            PADDED_ROWS_MAX:
        return 0
    return -t % SHAPE_STEP


def attention(q, k, v, mask, scale: float, softcap: float | None, sinks: torch.Tensor | None = None):
    """q (B, Hq, T, D), k/v (B, Hkv, S, D); mask: bool (B, 1, T, S), True = attend, or an additive float mask
    (0 / -inf), or None: plain causal when T == S, everything when T == 1 (one new token over a cache), or a
    SlidingWindow (T == S): causal within the window, without a dense mask (models/window_attention.py).
    sinks (Hq,): gpt-oss's learned logit per head, one more term exp(sink) in each softmax denominator with no
    value (transformers' GptOss eager attention); see attention_with_sinks."""
    if isinstance(mask, SlidingWindow):
        if q.shape[2] != k.shape[2]:  # the last queries only (Gemma 4's last-position layers in a prefill)
            mask = mask.dense(q.shape[2], q.device, k.shape[2])
        elif softcap:  # banded blocks of eager soft-capped scores: window x 2 window each, not T x T
            if q.shape[2] <= mask.size:
                return softcapped_attention(q, k, v, None, scale, softcap)
            return banded_attention(q, k, v, mask.size, scale, sdpa=partial(softcapped_sdpa, softcap=softcap))
        elif sinks is None:
            return sliding_window_attention(q, k, v, mask.size, scale)
    if sinks is not None:
        return attention_with_sinks(q, k, v, mask, scale, sinks)
    if softcap:
        return softcapped_attention(q, k, v, mask, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    causal = mask is None and q.shape[2] > 1
    if gqa and q.is_cuda and q.shape[2] > 1 and (mask is not None or q.shape[-1] > FLASH_MAX_HEAD_DIM):
        # The fused kernels that take grouped heads (flash, cuDNN) take neither a mask nor heads wider than 256
        # channels (Gemma 4's full layers); the memory-efficient one takes both but not grouped heads. Left grouped,
        # SDPA falls back to its math path, which holds (B, H, T, S) fp32 scores (32 GiB at 16K tokens).
        groups = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), False

    pad = shape_padding(q, k) if causal else 0

    def attend():
        """The SDPA call itself (kept_attention may answer its fused kernel from the forward pass)."""
        if pad:  # (see SHAPE_STEP)
            qp, kp, vp = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                                  enable_gqa=gqa)[:, :, :q.shape[2]]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)

    if causal and q.shape[2] == k.shape[2]:  # training's plain causal case: recompute may reuse the forward's result
        return kept_attention(attend)
    return attend()


def softcapped_attention(q, k, v, mask, scale: float, softcap: float):
    """Gemma 2's attention: scores softcapped (softcap * tanh(scores / softcap)) before the mask and softmax, which
    SDPA cannot do: the exact eager path (transformers' eager_attention_forward). Arguments as `attention`'s with a
    tensor mask or None (causal)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and q.shape[2] > 1:
        t = q.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softcapped_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, softcap: float):
    """softcapped_attention behind F.scaled_dot_product_attention's signature (bool masks), for banded_attention."""
    return softcapped_attention(q, k, v, attn_mask, scale, softcap)


def attention_with_sinks(q, k, v, mask, scale: float, sinks: torch.Tensor):
    """Attention whose softmax denominators also hold exp(sinks[h]), through SDPA's fused kernels.

    The sink is one more key, put first, whose score is the sink logit and whose value is zero: q gets one more
    channel holding sinks[h] / scale, k one holding 1 for the sink key and 0 for the real keys (the same for every
    head, so grouped-query attention stays grouped), both padded with zeros to a multiple of 8 channels so flash /
    memory-efficient attention still take them; v is zero there. Every query sees the sink key: causal attention
    without a mask becomes lower-right aligned (query i sees the sink and keys 0..i), a mask gets a leading
    always-on column; a SlidingWindow (T == S) runs as banded blocks that each see the sink key first
    (window_attention.banded_attention). Gradients reach q, k, v and sinks through the same graph."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    pad = -(-(d + 1) // 8) * 8 - d - 1
    sink_channel = (sinks.to(q.dtype) / scale).view(1, hq, 1, 1).expand(b, hq, t, 1)
    q = F.pad(torch.cat((q, sink_channel), dim=-1), (0, pad))
    sink_key = F.pad(k.new_ones(b, hkv, 1, 1), (d, pad))  # (B, Hkv, 1, width): 1 in channel d
    k, v = F.pad(k, (0, 1 + pad)), F.pad(v, (0, 1 + pad))  # zero channels to match q's width
    if isinstance(mask, SlidingWindow):
        if t > mask.size:
            return banded_attention(q, k, v, mask.size, scale, lead=(sink_key, torch.zeros_like(sink_key)))[..., :d]
        mask = None  # the window never bites
    k = torch.cat((sink_key, k), dim=2)
    v = F.pad(v, (0, 0, 1, 0))  # a zero value for the sink key
    if mask is None and t > 1:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(t, s + 1)
    elif mask is not None:
        first = mask.new_ones(*mask.shape[:-1], 1) if mask.dtype == torch.bool else mask.new_zeros(*mask.shape[:-1], 1)
        mask = torch.cat((first.expand(*mask.shape[:-1], 1), mask), dim=-1)
    gqa = hq != hkv
    if gqa and isinstance(mask, torch.Tensor) and t > 1:
        # SDPA's memory-efficient CUDA kernel takes masks but not grouped heads; with both it would fall back to
        # the math path, which forms the (B, H, T, S) scores: repeating k/v heads costs far less.
        k, v, gqa = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[..., :d]


def attention_with_sinks_reference(q, k, v, mask, scale: float, sinks: torch.Tensor):
    """transformers' GptOss eager attention (scores, sink column appended, max subtracted, softmax, sink dropped),
    for the tests; arguments as attention_with_sinks with a bool mask or None (causal)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    col = sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(scores.dtype)
    logits = torch.cat((scores, col), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v
