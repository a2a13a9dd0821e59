"""The fused decode attention (kernels/decode_attention.py) against the unfused path: same output, same cache."""
import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.decode_attention import (  # noqa: E402
    _tiling, decode_attention, decode_attention_reference, decode_attention_usable)

DEVICE, DTYPES = dtypes_for_device()


def _case(b, hq, hkv, d, rot, cap, s, slot, dtype, window=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    q, k, v = rnd(b, 1, hq, d), rnd(b, 1, hkv, d), rnd(b, 1, hkv, d)
    angle = torch.rand(b, 1, rot // 2, generator=g) * 6.0
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    k_cache, v_cache = rnd(b, hkv, cap, d), rnd(b, hkv, cap, d)
    visible = torch.arange(s) <= slot
    visible = visible.expand(b, s).clone()
    visible[1:, :3] = False  # left padding of the later rows
    if window is not None:
        visible &= slot - torch.arange(s) < window
    mask = torch.zeros(b, 1, 1, s).masked_fill(~visible[:, None, None], float("-inf")).to(DEVICE, dtype)
    return q, k, v, cos, sin, k_cache, v_cache, torch.tensor([slot], device=DEVICE), mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hkv,d,rot,cap,s,slot,window,splits", [
    (2, 4, 2, 16, 16, 40, 32, 20, None, None),   # GQA groups of 2, one split
    (3, 6, 2, 16, 8, 80, 80, 79, None, 4),       # groups of 3 (padded to 4), partial rotary, four splits
    (2, 8, 8, 32, 32, 64, 48, 30, 5, 2),         # plain MHA, a sliding window of 5, two splits
    (1, 4, 1, 16, 16, 300, 256, 3, None, 8),     # early in a long bucket: most splits see only masked slots
    (2, 4, 2, 24, 24, 40, 40, 33, None, None),   # head_dim not a power of two (Phi-3's 96), padded tiles
    (33, 2, 2, 16, 16, 24, 24, 10, None, None),  # 66 (row, head) pairs: the large-batch tiling, one split
])
def test_decode_attention_equals_the_unfused_path(dtype, b, hq, hkv, d, rot, cap, s, slot, window, splits):
    args = _case(b, hq, hkv, d, rot, cap, s, slot, dtype, window)
    ours_args = [a.clone() for a in args]
    ref_args = [a.clone() for a in args]
    exact_args = [a.double() if a.is_floating_point() else a for a in args]
    ours = decode_attention(*ours_args, scale=d ** -0.5, splits=splits)
    ref = decode_attention_reference(*ref_args, scale=d ** -0.5)
    exact = decode_attention_reference(*exact_args, scale=d ** -0.5)
    assert ours.shape == (b, 1, hq * d) and ours.dtype == dtype
    assert_as_good_as_reference(ours, ref, exact, dtype, "decode attention")
    # the cache: the rotated key and the value at `slot`, every other slot untouched
    torch.testing.assert_close(ours_args[5], ref_args[5], rtol=0, atol=1e-2 if dtype != torch.float32 else 1e-6)
    assert torch.equal(ours_args[6], ref_args[6])
    untouched = torch.ones(ours_args[5].shape[2], dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(ours_args[5][:, :, untouched], args[5][:, :, untouched])


def test_default_splits_agree_with_one_split():
    args = _case(1, 4, 2, 16, 16, 600, 512, 400, torch.float32)
    one = decode_attention(*[a.clone() for a in args], scale=0.25, splits=1)
    many = decode_attention(*[a.clone() for a in args], scale=0.25)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_large_batches_take_one_split_of_32_slot_tiles():
    """From 256 (row, KV head) pairs on, one split of 32-slot tiles (checked here on two rows; the loop ends
    mid-tile)."""
    assert _tiling(256, 512) == (32, 1) and _tiling(128, 512) == (64, 1) and _tiling(8, 512)[0] == 128
    args = _case(2, 4, 2, 16, 16, 80, 80, 70, torch.float32)
    want = decode_attention_reference(*[a.clone() for a in args], scale=0.25)
    got = decode_attention(*[a.clone() for a in args], scale=0.25, splits=1, block_s=32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 4])
def test_slots_after_the_new_token_are_never_read(splits):
    """The loop over cached slots stops at the new token's slot (the rest of the KV bucket is unwritten): a mask
    that shows those slots changes nothing."""
    args = _case(2, 4, 2, 16, 16, 300, 256, 40, torch.float32)
    shown = args[-1].clone()
    shown[..., 41:] = 0.0
    want = decode_attention_reference(*[a.clone() for a in args], scale=0.25)
    got = decode_attention(*[a.clone() for a in args[:-1]], shown, scale=0.25, splits=splits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise_and_usable_says_when():
    q, k, v, cos, sin, kc, vc, slot, mask = _case(2, 4, 2, 16, 16, 40, 32, 5, torch.float32)
    with pytest.raises(ValueError, match="one token"):
        decode_attention(q.expand(2, 2, 4, 16), k, v, cos, sin, kc, vc, slot, mask, 0.25)
    with pytest.raises(ValueError, match="additive mask"):
        decode_attention(q, k, v, cos, sin, kc, vc, slot, mask[:1], 0.25)
    with torch.no_grad():
        assert decode_attention_usable(q, mask, None, None)
        assert not decode_attention_usable(q, mask, 50.0, None)  # Gemma 2's softcapping
        assert not decode_attention_usable(q, mask, None, torch.zeros(4))  # gpt-oss's sinks
        assert not decode_attention_usable(q, mask > 0, None, None)  # a bool mask
    assert not decode_attention_usable(q, mask, None, None)  # autograd on
