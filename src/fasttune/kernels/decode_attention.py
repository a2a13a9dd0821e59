"""Attention of one new token per row over the KV cache (a decode step), with the token's RoPE and its cache write
in the same launch.

A decode step at batch 1 is bound by kernel count as much as by bytes: per layer the ordinary path launches RoPE,
two cache writes (index_copy_) and SDPA (whose kernels are built for long queries: 7 us on an H200 for 256 cached
slots of a 1B model). Here one program per (row, KV head, split of the cached slots) rotates the group's query
heads and the new key, writes the new key/value at the cache slot, and runs an online softmax (flash-decoding:
Dao et al., https://crfm.stanford.edu/2023/10/12/flashdecoding.html) over its share of the slots; with several
splits a second launch merges the partial softmaxes. The new token's own key/value enter from registers, not from
the cache, so no program reads a slot another program is writing.

The scores and the weighted values are tensor-core products (a KV head's query group padded to 16 rows, as
flash-decoding kernels do) accumulated in fp32, the softmax weights rounded to the model dtype before the second
product as flash attention does; the rotated query and key are rounded to the model dtype first, as the unfused
path stores them. The reference (`decode_attention_reference`) is the unfused path itself: apply_rope_qk, the cache write and
SDPA with the additive mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2
from fasttune.kernels.rope import apply_rope_qk


def decode_attention_reference(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale: float) -> torch.Tensor:
    """The unfused decode attention.

    q (B, 1, Hq, D), k/v (B, 1, Hkv, D): the new token's projections before RoPE (Hq a multiple of Hkv);
    cos/sin (B, 1, R), R <= D the rotary dims (the rest pass through); k_cache/v_cache (B, Hkv, L, D), written
    in place at `slot` ((1,) int64 on the device) with the rotated key and the value; mask (B, 1, 1, S), S <= L:
    additive (0 attend, -inf not) over cache slots [0, S), covering `slot` itself. Returns (B, 1, Hq * D) in q's
    dtype."""
    b, _, hq, d = q.shape
    q, k = apply_rope_qk(q, k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    s = mask.shape[-1]
    out = F.scaled_dot_product_attention(q, k_cache[:, :, :s], v_cache[:, :, :s], attn_mask=mask, scale=scale,
                                         enable_gqa=hq != k.shape[1])
    return out.transpose(1, 2).reshape(b, 1, hq * d)


def decode_attention_usable(q: torch.Tensor, mask, softcap, sinks) -> bool:
    """Whether `decode_attention` computes this step: one new token, no autograd, an additive float mask (B, 1, 1,
    S), no logit softcapping (Gemma 2) and no attention sinks (gpt-oss), which the kernel does not do."""
    return (HAVE_TRITON and q.shape[1] == 1 and not torch.is_grad_enabled() and not softcap and sinks is None
            and isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dim() == 4
            and mask.shape[1] == mask.shape[2] == 1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_attn(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, mask_ptr, out_ptr,
                     part_ptr, stat_ptr, S, L, chunk, scale,
                     HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                     PRECISION: tl.constexpr):
        bh = tl.program_id(0)  # row * HKV + kv head
        split = tl.program_id(1)
        b = bh // HKV
        g = bh % HKV
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        gi = tl.arange(0, BLOCK_G)
        gm = gi < G
        # RoPE as rotate_half: out[d] = x[d] cos[d] + sign[d] x[partner[d]] sin[d] on the first 2*HALF dims
        rot = d < 2 * HALF
        partner = tl.where(rot, tl.where(d < HALF, d + HALF, d - HALF), d)
        c = tl.load(cos_ptr + b * 2 * HALF + d, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + b * 2 * HALF + d, mask=rot, other=0.0).to(tl.float32)
        s = tl.where(d < HALF, -s, s)
        q_rows = (b * HQ + g * G + gi).to(tl.int64)[:, None] * D
        qm = gm[:, None] & dm[None, :]
        qa = tl.load(q_ptr + q_rows + d[None, :], mask=qm, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + q_rows + partner[None, :], mask=qm, other=0.0).to(tl.float32)
        qr = (qa * c[None, :] + qb * s[None, :]).to(q_ptr.dtype.element_ty).to(tl.float32)
        kv_row = (b * HKV + g).to(tl.int64) * D
        ka = tl.load(k_ptr + kv_row + d, mask=dm, other=0.0).to(tl.float32)
        kb = tl.load(k_ptr + kv_row + partner, mask=dm, other=0.0).to(tl.float32)
        k_new = (ka * c + kb * s).to(kc_ptr.dtype.element_ty)
        v_new = tl.load(v_ptr + kv_row + d, mask=dm, other=0.0).to(vc_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr)
        cache = (b * HKV + g).to(tl.int64) * L * D
        first = (d * 0 + split) == 0  # (BLOCK_D,): a vector, as masks must be
        # split 0 writes the new key/value and starts its softmax with them; the others start empty
        tl.store(kc_ptr + cache + slot * D + d, k_new, mask=dm & first)
        tl.store(vc_ptr + cache + slot * D + d, v_new, mask=dm & first)
        own = tl.sum(qr * k_new.to(tl.float32)[None, :], axis=1) * scale
        lead = split == 0
        m_i = tl.where(gm & lead, own, -1e30)
        l_i = tl.where(gm & lead, 1.0, 0.0)
        acc = tl.where(qm & first[None, :], v_new.to(tl.float32)[None, :], 0.0)
        qd = qr.to(kc_ptr.dtype.element_ty)  # (BLOCK_G >= 16, BLOCK_D): the group's heads as one tensor-core tile
        start = split * chunk
        # slots from the new token's on are its own (from registers) or not yet written: causally never read, so
        # the loop stops there instead of running masked tiles up to the KV bucket's end
        end = tl.minimum(tl.minimum(start + chunk, S), slot)
        for s0 in range(start, end, BLOCK_S):
            j = s0 + tl.arange(0, BLOCK_S)
            add = tl.load(mask_ptr + b * S + j, mask=j < end, other=float("-inf")).to(tl.float32)
            add = tl.where(j == slot, float("-inf"), add)  # the new token came from registers above
            live = add > float("-inf")  # masked slots are not even read
            offs = cache + j.to(tl.int64)[:, None] * D + d[None, :]
            km = live[:, None] & dm[None, :]
            kt = tl.load(kc_ptr + offs, mask=km, other=0.0)
            sc = tl.dot(qd, tl.trans(kt), input_precision=PRECISION) * scale + add[None, :]
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            vt = tl.load(vc_ptr + offs, mask=km, other=0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new
        if SPLITS == 1:
            out = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(out_ptr + q_rows + d[None, :], out.to(out_ptr.dtype.element_ty), mask=qm)
        else:
            at = (bh * SPLITS + split).to(tl.int64)
            tl.store(stat_ptr + at * 2 * BLOCK_G + gi, m_i)
            tl.store(stat_ptr + at * 2 * BLOCK_G + BLOCK_G + gi, l_i)
            tl.store(part_ptr + at * BLOCK_G * BLOCK_D + gi[:, None] * BLOCK_D + d[None, :], acc)

    @triton.jit
    def _merge_splits(part_ptr, stat_ptr, out_ptr, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                      D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // HKV
        g = bh % HKV
        sp = tl.arange(0, SPLITS)
        gi = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        at = (bh * SPLITS + sp).to(tl.int64)
        m = tl.load(stat_ptr + at[:, None] * 2 * BLOCK_G + gi[None, :])
        l_ = tl.load(stat_ptr + at[:, None] * 2 * BLOCK_G + BLOCK_G + gi[None, :])
        top = tl.max(m, axis=0)
        w = tl.exp(m - top[None, :])
        total = tl.sum(l_ * w, axis=0)
        acc = tl.load(part_ptr + at[:, None, None] * BLOCK_G * BLOCK_D + gi[None, :, None] * BLOCK_D
                      + d[None, None, :])
        out = tl.sum(acc * w[:, :, None], axis=0) / tl.maximum(total, 1e-30)[:, None]
        q_rows = (b * HQ + g * G + gi).to(tl.int64)[:, None] * D
        tl.store(out_ptr + q_rows + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(gi < G)[:, None] & (d < D)[None, :])


def _tiling(batch_heads: int, s: int) -> tuple[int, int]:
    """(BLOCK_S, splits) for `batch_heads` (row, KV head) pairs over s cached slots: two tiles of 128 slots per
    program while that leaves the card's SMs something to do (about 128 programs), one split for large batches,
    where the (row, head) pairs alone fill the card: tiles of 64 slots, of 32 from 256 pairs on. The fastest of 18
    settings on an H200 (inside CUDA graphs, 8 KV heads): head_dim 64 at batch 1, 5.2 us for 256 slots, 6.6 for
    512, 10.8 for 4096 (the unfused RoPE + cache write + SDPA: 12.4, 13.0, 14.4); head_dim 128, 512 slots: 10.7
    (15.2). Head_dim 128, 32 query heads, a 512-slot bucket, the new token at slot 100 / 300 / 500 (10 settings,
    since the loop stops at the new token's slot): batch 16, 64-slot tiles 5.7 / 11.0 / 14.9 us (32: 6.8 / 15.7 /
    23.6); batch 64, 32-slot tiles 13.8 / 26.5 / 39.4 (64: 16.8 / 31.7 / 45.2; two splits or more were slower in
    every case), the K/V reads at ~3 TB/s."""
    if batch_heads > 64:
        return (32 if batch_heads >= 256 else 64), 1
    cap = max(1, 128 // batch_heads)
    return 128, min(next_pow2(-(-s // 256)), 1 << (cap.bit_length() - 1))


def decode_attention(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale: float, splits: int | None = None,
                     block_s: int | None = None):
    """`decode_attention_reference` in one Triton launch (two with several splits); same arguments and result.

    splits: how many programs share one (row, KV head)'s cached slots (a power of two), block_s: cached slots per
    tile (a power of two >= 16); both default to `_tiling`'s choice. Cache slots after `slot` are never read (keys
    after the new token's are causally unseen), whatever the mask says of them.
    Raises ValueError for shapes the kernel does not take (see decode_attention_usable for the caller's check)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    s = mask.shape[-1]
    if t != 1 or hq % hkv or k_cache.shape != (b, hkv, k_cache.shape[2], d) or s > k_cache.shape[2]:
        raise ValueError("decode_attention takes one token per row over a (B, Hkv, L, D) cache")
    if mask.shape != (b, 1, 1, s) or cos.shape[-1] > d or cos.shape[-1] % 2:
        raise ValueError("decode_attention takes a (B, 1, 1, S) additive mask and even rotary dims <= head_dim")
    g = hq // hkv
    block_g, block_d = max(16, next_pow2(g)), max(16, next_pow2(d))  # tl.dot takes tiles of 16 and more
    default_block, default_splits = _tiling(b * hkv, s)
    block_s, n_splits = block_s or default_block, splits or default_splits
    chunk = -(-(-(-s // n_splits)) // block_s) * block_s
    q, k, v, cos, sin, mask = (x.contiguous() for x in (q, k, v, cos, sin, mask))
    out = torch.empty(b, 1, hq * d, dtype=q.dtype, device=q.device)
    if n_splits > 1:
        part = torch.empty(b * hkv * n_splits * block_g * block_d, dtype=torch.float32, device=q.device)
        stat = torch.empty(b * hkv * n_splits * 2 * block_g, dtype=torch.float32, device=q.device)
    else:
        part = stat = out
    meta = dict(HQ=hq, HKV=hkv, G=g, D=d, BLOCK_G=block_g, BLOCK_D=block_d, SPLITS=n_splits)
    _decode_attn[(b * hkv, n_splits)](q, k, v, cos, sin, k_cache, v_cache, slot, mask, out, part, stat, s,
                                      k_cache.shape[2], chunk, scale, HALF=cos.shape[-1] // 2, BLOCK_S=block_s,
                                      PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, **meta)
    if n_splits > 1:
        _merge_splits[(b * hkv,)](part, stat, out, num_warps=4, **meta)
    return out
