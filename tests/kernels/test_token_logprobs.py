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


@pytest.mark.parametrize("impl", [token_logprobs, token_logprobs_reference])
def test_fp32_head_on_bf16_inputs(impl):
    """fp32=True (TRL's cast_lm_head_to_fp32): log-probs and entropies of bf16 hidden states and weights equal the
    fp64 product of the same values, where the default's bf16-rounded logits are visibly off; gradients stay close
    to fp64's (bf16 outputs)."""
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(40, 64, generator=g) * 1.5).bfloat16().requires_grad_()
    weight = torch.randn(90, 64, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 90, (40,), generator=g)
    up = torch.randn(40, generator=g, dtype=torch.float64)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = _plain(h64, w64, labels, None, 0.9)
    gh, gw = torch.autograd.grad((want * up).sum(), (h64, w64))
    got, ent = impl(hidden, weight, labels, None, 0.9, chunk_tokens=16, entropy=True, fp32=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), _plain_entropy(h64, w64, None, 0.9), rtol=1e-5, atol=1e-5)
    rounded = impl(hidden, weight, labels, None, 0.9, chunk_tokens=16)
    assert (rounded.double() - want).abs().max() > 1e-2  # what the cast buys (logits ~ 12 in bf16)
    h2, w2 = torch.autograd.grad((got.double() * up).sum(), (hidden, weight))
    assert h2.dtype == w2.dtype == torch.bfloat16
    torch.testing.assert_close(h2.double(), gh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w2.double(), gw, rtol=2e-2, atol=2e-2)


def _extras_oracle(z, labels):
    """mean logit, first-argmax hit, log sum p^2 in fp64 from full logits, written out."""
    p = z.softmax(-1)
    first = torch.stack([(row == row.max()).nonzero()[0, 0] for row in z])
    return torch.stack([z.mean(-1), (first == labels).double(), (p * p).sum(-1).log()], 1)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("grad", [True, False])
def test_extras_on_the_fused_and_reference_paths(monkeypatch, softcap, grad):
    """extras (TRL's DPO outputs mean_logits, is_top1, log_sum_sq_probs) equal the fp64 formulas, chunked over 8
    rows, with and without a gradient (fused / reference path); a tie with an earlier column is not a hit; the
    log-probs are unchanged."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(21, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    weight[7] = weight[3]  # labels 7 with argmax 3 and 7 tied: a miss (the first maximum is 3)
    labels = torch.randint(0, 50, (21,), generator=g)
    z = hidden @ weight.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    labels[:5] = z[:5].argmax(-1)  # some hits
    hidden[5] = weight[3] * 3  # a row whose largest logits are columns 3 and 7
    labels[5] = 7
    z = hidden @ weight.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    want = _extras_oracle(z, labels)
    assert want[:5, 1].all() and want[5, 1] == 0
    for kernels in ("triton", "torch"):
        monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
        extras = torch.zeros(21, 3, dtype=torch.float32)
        h = hidden.clone().requires_grad_(grad)
        logps = token_logprobs(h, weight, labels, softcap, chunk_tokens=8, extras=extras)
        torch.testing.assert_close(extras.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logps.double(), _plain(hidden, weight, labels, softcap, 1.0), rtol=1e-5,
                                   atol=1e-5)
        if grad:
            logps.sum().backward()
            assert h.grad is not None


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (5.0, 0.8)])
def test_fused_forward_with_the_row_stats_kernel(monkeypatch, softcap, temperature):
    """fp32 inputs under FASTTUNE_KERNELS=triton: the fused forward's statistics come from the Triton row kernel
    (the interpreter on a CPU); log-probs, entropies, extras and gradients equal the torch reference's."""
    from fasttune.kernels.dispatch import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("no triton")
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(19, 16, generator=g).requires_grad_()
    weight = torch.randn(300, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 300, (19,), generator=g)
    up_l, up_h = torch.randn(19, generator=g), torch.randn(19, generator=g)
    results = []
    for kernels in ("triton", "torch"):
        monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
        extras = torch.zeros(19, 3)
        logps, ent = token_logprobs(hidden, weight, labels, softcap, temperature, chunk_tokens=8, entropy=True,
                                    extras=extras)
        grads = torch.autograd.grad((logps * up_l).sum() + (ent * up_h).sum(), (hidden, weight))
        results.append((logps.detach(), ent.detach(), extras, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
