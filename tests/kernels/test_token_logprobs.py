"""Fused per-token log-probs (GRPO) against plain log_softmax: values and gradients of hidden and lm_head."""
import pytest
import torch

from fasttune.kernels.token_logprobs import token_logprobs, token_logprobs_reference


def _plain(hidden, weight, labels, softcap, temperature):
    z = hidden @ weight.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return (z / temperature).log_softmax(-1).gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (5.0, 1.3)])
@pytest.mark.parametrize("impl", [token_logprobs, token_logprobs_reference])
def test_token_logprobs_match_log_softmax(impl, softcap, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g, dtype=torch.float64)
    want = _plain(hidden, weight, labels, softcap, temperature)
    gh, gw = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    got = impl(hidden, weight, labels, softcap, temperature, chunk_tokens=8)  # several chunks
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    h2, w2 = torch.autograd.grad((got.double() * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(h2, gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2, gw, rtol=1e-5, atol=1e-5)


def test_token_logprobs_without_grad_and_empty():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(hidden, weight, labels), _plain(hidden, weight, labels, None, 1.0))
    assert token_logprobs(hidden[:0], weight, labels[:0]).shape == (0,)


def _plain_entropy(hidden, weight, softcap, temperature):
    z = hidden @ weight.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    logp = (z / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (5.0, 0.7)])
@pytest.mark.parametrize("impl", [token_logprobs, token_logprobs_reference])
@pytest.mark.parametrize("use", ["both", "entropy"])
def test_token_entropy_and_its_grad(impl, softcap, temperature, use):
    """entropy=True gives each row's entropy of the temperature-scaled distribution; gradients through the log-probs
    and the entropy together, or through the entropy alone (the log-probs unused)."""
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(29, 16, generator=g, dtype=torch.float64) * 2).requires_grad_()
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 50, (29,), generator=g)
    up_l, up_h = torch.randn(29, generator=g, dtype=torch.float64), torch.randn(29, generator=g, dtype=torch.float64)
    want_l, want_h = _plain(hidden, weight, labels, softcap, temperature), _plain_entropy(hidden, weight, softcap,
                                                                                        temperature)
    target = (want_h * up_h).sum() + ((want_l * up_l).sum() if use == "both" else 0)
    gh, gw = torch.autograd.grad(target, (hidden, weight))
    got_l, got_h = impl(hidden, weight, labels, softcap, temperature, chunk_tokens=8, entropy=True)
    assert got_h.dtype == torch.float32 and (got_h > 0).all()
    torch.testing.assert_close(got_l.double(), want_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h.double(), want_h, rtol=1e-5, atol=1e-5)
    target = (got_h.double() * up_h).sum() + ((got_l.double() * up_l).sum() if use == "both" else 0)
    h2, w2 = torch.autograd.grad(target, (hidden, weight))
    torch.testing.assert_close(h2, gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2, gw, rtol=1e-5, atol=1e-5)


def test_entropy_without_grad_and_empty():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        _, ent = token_logprobs(hidden, weight, labels, entropy=True)
    torch.testing.assert_close(ent, _plain_entropy(hidden, weight, None, 1.0))
    logps, ent = token_logprobs(hidden[:0], weight, labels[:0], entropy=True)
    assert logps.shape == ent.shape == (0,)
