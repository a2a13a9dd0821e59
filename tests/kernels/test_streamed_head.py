"""The LM head streamed in tiles (kernels/streamed_head.py) against plain fp64 math: the one-pass online-softmax
loss and its hidden-state gradient, token log-probs and their gradient, logits; softcap and ignored rows, tiles
and token chunks that do not divide the sizes."""
import pytest
import torch
import torch.nn.functional as F

from fasttune.kernels import streamed_head as sh


def _oracle_logits(h, w, softcap):
    z = h @ w.t()
    return torch.tanh(z / softcap) * softcap if softcap else z


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(sh, "TILE_ROWS", 7)           # 45 rows: six full tiles and a partial one
    monkeypatch.setattr(sh, "CHUNK_BYTES", 4 * 7 * 4)  # four tokens a chunk: 10 tokens, three chunks


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(10, 16, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    w = torch.randn(45, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 45, (10,), generator=g)
    y[3] = -100
    y[7] = 44  # the last row of the last, partial tile
    return h, w, y


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_cross_entropy_loss_and_grad(small_tiles, softcap):
    h, w, y = _inputs()
    got = sh.streamed_cross_entropy(h, w, y, softcap)
    (g_got,) = torch.autograd.grad(got * 1.5, h)
    ref = F.cross_entropy(_oracle_logits(h, w, softcap), y, ignore_index=-100, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 1.5, h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(g_got[3], torch.zeros(16, dtype=torch.float64))  # the ignored row


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (5.0, 0.7)])
def test_token_logprobs_and_grad(small_tiles, softcap, temperature):
    h, w, y = _inputs(1)
    y = y.clamp(min=0)
    # the log-probs are fp32, so the incoming gradient is too: values exact in fp32 keep the comparison exact
    go = torch.randn(10, generator=torch.Generator().manual_seed(2)).double()
    got = sh.streamed_token_logprobs(h, w, y, softcap, temperature)
    (g_got,) = torch.autograd.grad(got.double() @ go, h)
    ref = (_oracle_logits(h, w, softcap) / temperature).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    (g_ref,) = torch.autograd.grad(ref @ go, h)
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (5.0, 0.7)])
@pytest.mark.parametrize("use", ["both", "entropy"])
def test_token_entropy_and_grad(small_tiles, softcap, temperature, use):
    """entropy=True: each token's entropy of the temperature-scaled distribution (an online sum over the tiles), and
    the gradient through log-probs and entropies together or the entropies alone."""
    h, w, y = _inputs(5)
    y = y.clamp(min=0)
    g = torch.Generator().manual_seed(6)
    go, ge = torch.randn(10, generator=g).double(), torch.randn(10, generator=g).double()
    logps, ent = sh.streamed_token_logprobs(h, w, y, softcap, temperature, entropy=True)
    target = ent.double() @ ge + (logps.double() @ go if use == "both" else 0)
    (g_got,) = torch.autograd.grad(target, h)
    logp_all = (_oracle_logits(h, w, softcap) / temperature).log_softmax(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    ref_l = logp_all.gather(1, y[:, None]).squeeze(1)
    (g_ref,) = torch.autograd.grad(ref_ent @ ge + (ref_l @ go if use == "both" else 0), h)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logps, ref_l.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logits(small_tiles, softcap):
    h, w, _ = _inputs(3)
    h = h.detach().view(2, 5, 16)
    torch.testing.assert_close(sh.streamed_logits(h, w, softcap), _oracle_logits(h, w, softcap), rtol=0, atol=1e-12)


def test_large_logits_do_not_overflow(small_tiles):
    """The online softmax rescales as the running max grows: logits in the hundreds, largest in the last tile."""
    h, w, y = _inputs(4)
    w = w.clone()
    w[44] = h.detach()[0] * 40  # token 0's logit of row 44 is ~1e3
    got = sh.streamed_cross_entropy(h, w, y)
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-4)


def test_cross_entropy_token_stats(small_tiles):
    """stats over the streamed tiles: entropy sum and first-argmax hits of the labelled rows, as full logits give
    them; a tie with an earlier column is no hit."""
    h, w, y = _inputs(7)
    w = w.clone()
    w[40] = w[2]  # columns 2 and 40 tie on every row (different tiles)
    z = _oracle_logits(h.detach(), w, None)
    y[0] = z[0].argmax()
    y[1], y[5] = 40, 2
    h = h.detach().clone()
    h[1] = h[5] = w[2] * 3  # columns 2 and 40 are the maxima of rows 1 and 5
    z = _oracle_logits(h, w, None)
    stats = torch.zeros(2, dtype=torch.float64)
    sh.streamed_cross_entropy(h.requires_grad_(), w, y, None, stats)
    logp = z.log_softmax(-1)
    valid = y != -100
    hits = ((z.argmax(-1) == y) & valid).sum()
    assert hits >= 2 and (z.argmax(-1)[1] == 2)  # row 5 hits (label 2), row 1 does not (label 40, tied later)
    torch.testing.assert_close(stats[0], (-(logp.exp() * logp).sum(-1))[valid].sum(), rtol=1e-9, atol=1e-9)
    assert stats[1] == hits


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_token_extras_equal_the_chunked_path(small_tiles, softcap):
    """The streamed head's extras (mean logit, first-argmax hit, log sum p^2), accumulated tile by tile, equal
    logit_extras on the whole logits, a tie across two tiles included."""
    from fasttune.kernels.token_logprobs import logit_extras

    h, w, y = _inputs(2)
    y[3] = 5
    w[40] = w[2]  # columns 2 and 40 (different tiles) tie; row 0's label 40 is then a miss, row 1's 2 a hit
    h = h.detach()
    h[0], h[1] = w[2] * 4, w[2] * 4
    y[0], y[1] = 40, 2
    z = _oracle_logits(h, w, softcap)
    extras = torch.zeros(10, 3, dtype=torch.float64)
    sh.streamed_token_logprobs(h, w, y, softcap, extras=extras)
    want = logit_extras(z, y).double()
    assert want[0, 1] == 0 and want[1, 1] == 1
    torch.testing.assert_close(extras, want, rtol=1e-9, atol=1e-9)
