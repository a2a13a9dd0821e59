"""Student-teacher divergences (on-policy distillation) against plain fp64 log_softmax formulas: values, the student's
entropy, and gradients of the student's hidden states and head, for the forward KL, the reverse KL and the JSD; the
top-k divergence of the self-distillation trainers against TRL's."""
import math

import pytest
import torch

from fasttune.kernels.distill_divergence import token_divergence, token_divergence_reference, topk_token_divergence


def _plain(hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t):
    def logp(h, w, cap):
        z = h @ w.t()
        if cap:
            z = torch.tanh(z / cap) * cap
        return (z / temperature).log_softmax(-1)

    lps, lpt = logp(hs, ws, softcap_s), logp(ht, wt[:ws.shape[0]], softcap_t)
    ps, pt = lps.exp(), lpt.exp()
    if beta == 0:
        div = (pt * (lpt - lps)).sum(-1)
    elif beta == 1:
        div = (ps * (lps - lpt)).sum(-1)
    else:
        m = (1 - beta) * ps + beta * pt
        div = beta * (pt * (lpt - m.log())).sum(-1) + (1 - beta) * (ps * (lps - m.log())).sum(-1)
    return div, -(ps * lps).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("impl", [token_divergence, token_divergence_reference])
@pytest.mark.parametrize("temperature,softcap_s,softcap_t", [(1.0, None, None), (0.7, 5.0, None)])
def test_divergence_matches_log_softmax(impl, beta, temperature, softcap_s, softcap_t):
    """Several chunks; a wider teacher (its own hidden size) whose head has 3 rows past the student's vocabulary."""
    g = torch.Generator().manual_seed(0)
    hs = (torch.randn(23, 16, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ws = torch.randn(40, 16, generator=g, dtype=torch.float64).requires_grad_()
    ht = torch.randn(23, 24, generator=g, dtype=torch.float64) * 2
    wt = torch.randn(43, 24, generator=g, dtype=torch.float64)
    up = torch.randn(23, generator=g, dtype=torch.float64)
    want, want_ent = _plain(hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t)
    gh, gw = torch.autograd.grad((want * up).sum(), (hs, ws))
    got, ent = impl(hs, ws, ht, wt, beta, temperature, softcap_s, softcap_t, chunk_tokens=5)
    assert got.dtype == ent.dtype == torch.float32 and (got >= -1e-6).all() and not ent.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-6)
    h2, w2 = torch.autograd.grad((got.double() * up).sum(), (hs, ws))
    # (the logits are fp32: logits near 20 leave ~1e-5 of absolute error in the smallest gradients)
    torch.testing.assert_close(h2, gh, rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(w2, gw, rtol=1e-4, atol=3e-5)


def test_identical_models_have_no_divergence_and_errors():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g)
    for beta in (0.0, 0.5, 1.0):
        div, ent = token_divergence(h, w, h, w, beta)
        torch.testing.assert_close(div, torch.zeros(6), atol=1e-6, rtol=0)
        assert (ent > 0).all() and (ent <= math.log(30) + 1e-5).all()
    with pytest.raises(ValueError, match="beta=1.5"):
        token_divergence(h, w, h, w, 1.5)
    with pytest.raises(ValueError, match="fewer than the student's"):
        token_divergence(h, w, h, w[:20], 0.5)
    empty, ent = token_divergence(h[:0], w, h[:0], w, 0.5)
    assert empty.shape == ent.shape == (0,)


@pytest.mark.parametrize("add_tail", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_divergence_matches_trl(beta, add_tail):
    """The top-k divergence (SDFT / SDPO) equals TRL's compute_topk_self_distillation_loss on the same logits (a
    wider teacher head, cut to the student's vocabulary; a temperature and a student softcap), values and
    gradients, over several chunks."""
    loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")
    g = torch.Generator().manual_seed(2)
    hs = (torch.randn(13, 16, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ws = torch.randn(40, 16, generator=g, dtype=torch.float64).requires_grad_()
    ht, wt = torch.randn(13, 24, generator=g, dtype=torch.float64) * 0.5, torch.randn(43, 24, generator=g,
                                                                                       dtype=torch.float64)
    zs = torch.tanh((hs @ ws.t()) / 5.0) * 5.0 / 0.7
    want = loss_utils.compute_topk_self_distillation_loss(zs, (ht @ wt[:40].t()) / 0.7, distillation_topk=6,
                                                          distillation_alpha=beta, distillation_add_tail=add_tail)
    up = torch.randn(13, generator=g, dtype=torch.float64)
    gh, gw = torch.autograd.grad((want * up).sum(), (hs, ws))
    got = topk_token_divergence(hs, ws, ht, wt, 6, beta, add_tail, 0.7, 5.0, None, chunk_tokens=4)
    assert got.dtype == torch.float32 and (got >= -1e-6).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    h2, w2 = torch.autograd.grad((got.double() * up).sum(), (hs, ws))
    torch.testing.assert_close(h2, gh, rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(w2, gw, rtol=1e-4, atol=3e-5)
    with pytest.raises(ValueError, match="k=41"):
        topk_token_divergence(hs, ws, ht, wt, 41, beta)
