"""Rotary position embeddings: inverse frequencies (default, linear, llama3, yarn scaling), cos/sin tables, apply.

`apply_rope_qk` takes q and k in the (batch, seq, heads, head_dim) layout the projections produce. The Triton
kernel rotates all of a token's q and k heads in one program (cos/sin read once per token), q and k in one launch,
and its backward is the same kernel with the angle negated; partial rotary dims pass through.
The outputs are new tensors: rotating in place would have to mark the projections' outputs dirty, which autograd
refuses for outputs of our custom LoRA function, and saves no memory (the unrotated q/k are freed at once).
"""
import functools
import math

import torch

from fasttune.kernels.dispatch import HAVE_TRITON, next_pow2, use_triton


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """fp32 inverse frequencies theta^(-2i / rotary_dim), shape (rotary_dim // 2,). `scaling` is the HF config's
    rope_scaling: "linear" divides by its factor, "llama3" follows transformers' _compute_llama3_parameters,
    "yarn" its _compute_yarn_parameters (modeling_rope_utils.py; yarn also scales cos/sin, see
    rope_attention_factor), "proportional" its _compute_proportional_rope_parameters (frequency 0 past the
    partial_rotary_factor of the pairs, on a rotary_dim that is the whole head). Raises ValueError for another
    rope_type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_inv_freq(rotary_dim, theta, scaling)
    if kind == "proportional":  # LFM3's (and Gemma 4's) global layers: transformers' _compute_proportional_rope_parameters
        # the first partial_rotary_factor of the pairs rotate, their exponents over the whole head; the rest stay put
        inv_freq[int(scaling.get("partial_rotary_factor", 1.0) * rotary_dim // 2):] = 0.0
        return inv_freq / scaling.get("factor", 1.0)
    raise ValueError(f"unsupported rope_type {kind}")


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention-magnitude term for a context `scale` (the rope factor) and multiplier `m`:
    0.1 * m * ln(scale) + 1, or 1 for scale <= 1 (transformers' get_mscale / yarn_get_mscale)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor transformers' rotary embeddings multiply cos and sin by: for yarn `attention_factor`, else
    0.1 * ln(factor) + 1 (or the ratio of two such terms with `mscale` / `mscale_all_dim`), 1 for factor <= 1;
    1.0 for every other rope_type (transformers' _compute_yarn_parameters)."""
    if not scaling or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(yarn_mscale(factor, m) / yarn_mscale(factor, m_all)) if m and m_all else float(yarn_mscale(factor))


def _yarn_inv_freq(dim: int, theta: float, s: dict) -> torch.Tensor:
    # YaRN (arXiv:2309.00071): frequencies that rotate fewer than beta_slow times over the original context are
    # interpolated (divided by `factor`), those rotating more than beta_fast times kept, a linear ramp between.
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The rotary dimension (a float index into 0..dim) whose frequency turns `rotations` times over old_len."""
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos/sin of shape (batch, seq, rotary_dim), computed in fp32, times `scale` (yarn's attention factor), then
    cast (as transformers does)."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); rotates the first cos.shape[-1] dims (partial rotary leaves the rest). The
    result is in x's dtype, also for fp32 cos/sin."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return (x * cos + _rotate_half(x) * sin).to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat(((x_rot * cos + _rotate_half(x_rot) * sin).to(x.dtype), x_pass), dim=-1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(x_ptr, y_ptr, tok, c, s, n_heads, head_dim, half, d, dmask, BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)
        base = tok * n_heads * head_dim + h[:, None] * head_dim + d[None, :]
        mask = (h[:, None] < n_heads) & dmask[None, :]
        x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + base, (x1 * c[None, :] - x2 * s[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + base + half, (x2 * c[None, :] + x1 * s[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, n_q, n_k, head_dim, half, sign,
                     BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)  # one (batch, position) per program: q and k heads together
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        c = tl.load(cos_ptr + tok * 2 * half + d, mask=dmask, other=0.0).to(tl.float32)
        s = sign * tl.load(sin_ptr + tok * 2 * half + d, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, qo_ptr, tok, c, s, n_q, head_dim, half, d, dmask, BLOCK_HQ)
        _rotate_heads(k_ptr, ko_ptr, tok, c, s, n_k, head_dim, half, d, dmask, BLOCK_HK)


def _rope_launch(q, k, cos, sin, sign: float):
    """Rotated copies of q and k, in one launch."""
    b, t, n_q, head_dim = q.shape
    half = cos.shape[-1] // 2
    partial = 2 * half < head_dim  # partial rotary: the tail passes through, so start from a copy
    qo, ko = (x.clone() if partial else torch.empty_like(x) for x in (q, k))
    _rope_kernel[(b * t,)](q, k, cos, sin, qo, ko, n_q, k.shape[2], head_dim, half, sign,
                           BLOCK_HQ=next_pow2(n_q), BLOCK_HK=next_pow2(k.shape[2]), BLOCK_D=next_pow2(half))
    return qo, ko


class _RopeFunction(torch.autograd.Function):
    """The Triton rotation of q and k in one launch; backward rotates the gradients back (see apply_rope_qk)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        """q (B, T, Hq, D), k (B, T, Hkv, D), cos/sin (B, T, rotary_dim) -> (rotated q, rotated k), new tensors."""
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q.contiguous(), k.contiguous(), cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        """(dq, dk) like the outputs -> (d(q), d(k), None, None): the inverse rotation of the gradients."""
        cos, sin = ctx.saved_tensors  # the inverse rotation: same angles, opposite sign
        return (*_rope_launch(dq.contiguous(), dk.contiguous(), cos, sin, -1.0), None, None)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(rotated q, rotated k) for q (B, T, Hq, D) and k (B, T, Hkv, D): one kernel launch for both."""
    if use_triton(q) and cos.shape[:2] == q.shape[:2]:
        return _RopeFunction.apply(q, k, cos, sin)
    return apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)


@functools.lru_cache(maxsize=None)
def pair_order(head_dim: int, rotary_dim: int, device: torch.device) -> torch.Tensor:
    """Channel order (head_dim,) int64 on `device` that puts a head's rotary channels 0, 2, 4, ... before
    1, 3, 5, ... (the rest after), turning adjacent-pair RoPE into the half-split RoPE our kernels apply."""
    rot = torch.arange(rotary_dim)
    return torch.cat([rot[0::2], rot[1::2], torch.arange(rotary_dim, head_dim)]).to(device)


def mrope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, section: list, dtype: torch.dtype,
                  interleaved: bool = False):
    """Multimodal RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL): position_ids (3, B, T) int, the temporal, height and
    width position of every token (all three equal for text); frequency j of the rotary half rotates with axis k
    where j lies in the k-th block of `section` (sizes summing to rotary_dim / 2), or, `interleaved` (Qwen3-VL),
    with axis j % 3 while j < 3 * section[k] (the rest temporal). Returns cos, sin (B, T, rotary_dim) in `dtype`,
    computed in fp32 as transformers' Qwen2_5_VL / Qwen3VL rotary embeddings do, so the rotary kernels apply them
    unchanged."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)  # (3, B, T, D/2)
    if interleaved:
        j = torch.arange(sum(section))
        axis = torch.where((j % 3 == 1) & (j < 3 * section[1]), 1, torch.where((j % 3 == 2) & (j < 3 * section[2]),
                                                                               2, 0))
    else:
        axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])
    freqs = freqs.gather(0, axis.to(freqs.device).view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
