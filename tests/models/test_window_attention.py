"""Sliding-window attention without a dense mask: the banded SDPA path and flash's window kernel against SDPA with the
dense (T x T) mask; which batches take it; and whole models (Gemma 3 / 4) equal with and without it."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.models import decoder
from fasttune.models.masks import build_masks
from fasttune.models.varlen import varlen_usable
from fasttune.models.window_attention import (SlidingWindow, banded_attention, sliding_window_attention,
                                              sliding_window_reference)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (batch, q heads, kv heads, tokens, head channels, window): whole blocks, a partial last block, grouped heads, a
# window of one token, tokens within one window
SHAPES = [(2, 4, 2, 17, 8, 4), (1, 2, 2, 16, 8, 4), (2, 4, 1, 9, 16, 8), (1, 2, 2, 5, 8, 8), (2, 2, 2, 33, 8, 1),
          (1, 4, 2, 40, 8, 13)]


def _qkv(b, hq, hkv, t, d, device="cpu", dtype=torch.float32):
    torch.manual_seed(t * 7 + d)
    return [torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv)]


def _with_grads(fn, q, k, v, window, scale=0.3):
    out = fn(q, k, v, window, scale)
    # (randn of the shape, not randn_like: that follows the output's strides, which differ between the paths)
    grad = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device,
                       dtype=out.dtype)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fn", [sliding_window_attention, banded_attention])
def test_window_attention_equals_the_dense_mask(shape, fn):
    *dims, window = shape
    q, k, v = _qkv(*dims)
    if fn is banded_attention and dims[3] <= window:
        pytest.skip("one block: sliding_window_attention runs plain causal attention")
    ours, ref = _with_grads(fn, q, k, v, window), _with_grads(sliding_window_reference, q, k, v, window)
    for a, b in zip(ours, ref):  # output, then the q, k, v gradients
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_sink_attention_in_windows_equals_transformers_eager(shape):
    """gpt-oss's sink logits with a SlidingWindow (banded blocks that each see the sink key first) against
    transformers' eager GptOss attention with the dense window mask; the sinks' gradient too."""
    from fasttune.models.attention import attention_with_sinks, attention_with_sinks_reference

    *dims, window = shape
    q, k, v = _qkv(*dims)
    sinks = torch.randn(dims[1], requires_grad=True)
    dense = SlidingWindow(window).dense(dims[3], "cpu")
    out = attention_with_sinks(q, k, v, SlidingWindow(window), 0.3, sinks)
    ref = attention_with_sinks_reference(q, k, v, dense, 0.3, sinks)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), grad), torch.autograd.grad(ref, (q, k, v, sinks), grad)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_softcapped_attention_in_windows_equals_the_dense_mask(shape):
    """Gemma 2's soft-capped scores with a SlidingWindow (banded blocks of eager scores) against the eager path
    with the dense window mask."""
    from fasttune.models.attention import attention

    *dims, window = shape
    q, k, v = _qkv(*dims)
    dense = SlidingWindow(window).dense(dims[3], "cpu")
    ours = _with_grads(lambda *a: attention(q, k, v, SlidingWindow(window), 0.3, 2.0), q, k, v, 0)
    ref = _with_grads(lambda *a: attention(q, k, v, dense, 0.3, 2.0), q, k, v, 0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_sliding_window_dense_mask_is_transformers_rule():
    m = SlidingWindow(3).dense(5, "cpu")[0, 0]
    assert m.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                          [True, True, True, False, False], [False, True, True, True, False],
                          [False, False, True, True, True]]


def test_last_queries_get_their_rows_of_the_mask():
    """Fewer queries than keys (a prefill's last-position layers): the window's rows for the last queries."""
    from fasttune.models.attention import attention

    full = SlidingWindow(3).dense(6, "cpu")
    assert torch.equal(SlidingWindow(3).dense(2, "cpu", 6), full[:, :, -2:])
    q, k, v = _qkv(1, 2, 2, 6, 8)
    want = sliding_window_reference(q, k, v, 3, 0.3)[:, :, -1:]
    torch.testing.assert_close(attention(q[:, :, -1:], k, v, SlidingWindow(3), 0.3, None), want)


def test_build_masks_hands_windows_to_the_kernel_only_when_nothing_else_restricts():
    windows = {None, 4}
    assert build_masks(None, 10, "cpu", windows, window_kernels=True) == {None: None, 4: SlidingWindow(4)}
    dense = build_masks(None, 10, "cpu", windows)  # a cache is in use: the dense masks, as before
    assert dense[4].shape == (1, 1, 10, 10) and dense[None].shape == (1, 1, 10, 10)
    padded = torch.ones(2, 10, dtype=torch.long)
    padded[0, :3] = 0
    assert build_masks(padded, 10, "cpu", windows, window_kernels=True)[4].shape == (2, 1, 10, 10)
    segments = torch.tensor([[1] * 6 + [2] * 4])
    assert build_masks(None, 10, "cpu", windows, segment_ids=segments, window_kernels=True)[4].shape == (1, 1, 10, 10)
    assert build_masks(None, 10, "cpu", windows, past=3, window_kernels=True)[4].shape == (1, 1, 10, 13)


def _forward_and_grads(model, ids, dense: bool, monkeypatch, seen: list):
    real = decoder.build_masks

    def spy(*args, **kwargs):
        if dense:
            kwargs["window_kernels"] = False
        masks = real(*args, **kwargs)
        seen.append(masks)
        return masks

    monkeypatch.setattr(decoder, "build_masks", spy)
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return logits.detach(), grads


def _model_with_and_without_kernels(folder, device, dtype, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=dtype, device=device)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    ids = torch.randint(3, 200, (2, 23), generator=torch.Generator().manual_seed(3)).to(device)
    seen = []
    fast = _forward_and_grads(model, ids, False, monkeypatch, seen)
    assert any(isinstance(m, SlidingWindow) for m in seen[-1].values()), "the windowed layers got a dense mask"
    dense = _forward_and_grads(model, ids, True, monkeypatch, seen)
    assert all(m is None or m.dim() == 4 for m in seen[-1].values())
    return fast, dense


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma4_text", "gpt_oss"])  # windows of 4, 23 tokens
def test_models_equal_with_and_without_the_window_kernel(family, tiny_model_dir, monkeypatch):
    (logits, grads), (ref_logits, ref_grads) = _model_with_and_without_kernels(
        tiny_model_dir(family), "cpu", torch.float32, monkeypatch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("head_dim", [128, 256, 512])  # 512: Gemma 4's full-layer width, beyond flash: banded SDPA
def test_bf16_window_attention_close_to_the_dense_mask_on_gpu(head_dim):
    q, k, v = _qkv(2, 8, 4, 3000, head_dim, "cuda", torch.bfloat16)
    if head_dim <= 256:
        assert varlen_usable(q, None, {1024}, head_dim), "this torch's varlen_attn takes no window_size"
    # (the models' scale: a sharper softmax makes bf16 rounding order dominate the comparison)
    ours, ref = _with_grads(sliding_window_attention, q, k, v, 1024, head_dim ** -0.5), \
        _with_grads(sliding_window_reference, q, k, v, 1024, head_dim ** -0.5)
    for a, b in zip(ours, ref):
        assert (a.float() - b.float()).abs().max() < 0.06 * b.float().abs().max() + 1e-3


@pytest.mark.gpu
@CUDA
def test_bf16_gemma3_takes_the_window_kernel_on_gpu(tiny_model_dir, monkeypatch):
    (logits, grads), (ref_logits, ref_grads) = _model_with_and_without_kernels(
        tiny_model_dir("gemma3_text"), "cuda", torch.bfloat16, monkeypatch)
    assert (logits.float() - ref_logits.float()).abs().max() < 0.05 * ref_logits.float().abs().max()
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g.float() - r.float()).abs().max() <= 0.05 * r.float().abs().max() + 1e-4


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("case", ["causal-512", "masked-128"])
def test_grouped_heads_reach_a_fused_kernel_on_gpu(case):
    """Grouped heads with 512 channels (Gemma 4's full layers) or with a mask: no fused kernel takes them grouped,
    so `attention` repeats the key/value heads rather than let SDPA fall back to its math path (which holds
    (B, H, T, T) fp32 scores). With the math path off, a fall-back raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fasttune.models.attention import attention

    d = 512 if case == "causal-512" else 128
    q, k, v = _qkv(1, 8, 2, 1024, d, "cuda", torch.bfloat16)
    mask = None if case == "causal-512" else SlidingWindow(1024).dense(1024, "cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        ours = _with_grads(lambda *a: attention(q, k, v, mask, d ** -0.5, None), q, k, v, 0)
    ref = _with_grads(sliding_window_reference, q, k, v, 1024, d ** -0.5)  # window = T: plain causal
    for a, b in zip(ours, ref):
        assert (a.float() - b.float()).abs().max() < 0.06 * b.float().abs().max() + 1e-3


@pytest.mark.gpu
@CUDA
def test_bf16_sink_attention_in_windows_on_gpu():
    """gpt-oss's shape (64 q / 8 kv heads of 64, window 128) in bf16: banded blocks with the sink key against
    transformers' eager attention with the dense mask."""
    from fasttune.models.attention import attention_with_sinks, attention_with_sinks_reference

    q, k, v = _qkv(1, 64, 8, 1000, 64, "cuda", torch.bfloat16)
    sinks = torch.randn(64, device="cuda", requires_grad=True)
    dense = SlidingWindow(128).dense(1000, "cuda")
    ours = _with_grads(lambda *a: attention_with_sinks(q, k, v, SlidingWindow(128), 0.125, sinks), q, k, v, 0)
    ref = _with_grads(lambda *a: attention_with_sinks_reference(q, k, v, dense, 0.125, sinks), q, k, v, 0)
    for a, b in zip(ours, ref):
        assert (a.float() - b.float()).abs().max() < 0.06 * b.float().abs().max() + 1e-3
