"""GPU check (skipped without CUDA) of the fp32 LM head (TRL's cast_lm_head_to_fp32): on bf16 CUDA tensors the fused
log-probs, entropies and their gradients, and the logits, equal the fp64 product of the same values; forward's
product (torch.mm with an fp32 output) makes no fp32 copy of the weight."""
import pytest
import torch

from fasttune.kernels.cross_entropy import logits_from_hidden
from fasttune.kernels.token_logprobs import token_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(n=300, h=256, v=5000):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 1.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / 4).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    return hidden, weight, labels


def test_fused_fp32_head_equals_fp64():
    hidden, weight, labels = _inputs()
    h64 = hidden.detach().double().requires_grad_()
    z = h64 @ weight.double().t() / 0.8
    logp = z.log_softmax(-1)
    want = logp.gather(1, labels[:, None]).squeeze(1)
    want_ent = -(logp.exp() * logp).sum(-1)
    up = torch.randn(want.shape, device="cuda", dtype=torch.float64)
    (gh,) = torch.autograd.grad((want * up).sum(), h64)
    got, ent = token_logprobs(hidden, weight, labels, temperature=0.8, chunk_tokens=128, entropy=True, fp32=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    rounded = token_logprobs(hidden, weight, labels, temperature=0.8, chunk_tokens=128)
    assert (rounded.double() - want).abs().max() > 1e-3  # the default's bf16 logits
    (h2,) = torch.autograd.grad((got.double() * up).sum(), hidden)
    torch.testing.assert_close(h2.double(), gh, rtol=2e-2, atol=2e-3)


def test_fp32_logits_without_a_weight_copy():
    hidden, weight, _ = _inputs(n=8, h=512, v=60000)
    want = hidden.detach().double() @ weight.double().t()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        got = logits_from_hidden(hidden.detach()[None], weight, fp32=True)
    extra = torch.cuda.max_memory_allocated() - base
    assert got.dtype == torch.float32 and got.shape == (1, 8, 60000)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-5)
    assert extra < weight.numel() * 4 // 2, extra  # the logits (2 MB), not an fp32 weight (123 MB)


def test_fp32_head_backward_without_a_weight_copy():
    """Backward's fp32 logit gradients meet the bf16 weight as two bf16 GEMMs (hi + lo) with fp32 outputs: the hidden
    states' gradient equals fp64's and the peak holds the chunk's logits, not an fp32 weight (123 MB)."""
    hidden, weight, labels = _inputs(n=64, h=512, v=60000)
    h64 = hidden.detach().double().requires_grad_()
    want = (h64 @ weight.double().t()).log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    (gh,) = torch.autograd.grad(want.sum(), h64)
    got = token_logprobs(hidden, weight, labels, fp32=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (h2,) = torch.autograd.grad(got.sum(), hidden)
    extra = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(h2.double(), gh, rtol=2e-2, atol=1e-3)
    assert extra < weight.numel() * 4 // 2, extra
