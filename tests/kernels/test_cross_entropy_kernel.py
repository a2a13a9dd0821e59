import pytest
import torch

from fasttune.kernels.cross_entropy import (_ce_chunk_grad_reference, _FusedLinearCrossEntropy,
                                            linear_cross_entropy_reference)
from fasttune.kernels.dispatch import HAVE_TRITON
from kernel_check import assert_as_good_as_reference, dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()
# the fused path's chunk math: torch reference, or the Triton kernel (the interpreter on a CPU)
KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="no triton"))]


def _grads(fn, h, w, y, softcap, chunk):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, y, softcap, chunk)
    (loss * 0.37).backward()  # a non-unit upstream gradient, as the GA normalisation gives
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("n, hdim, vocab, chunk, compact", [(37, 24, 1000, 8, True), (16, 33, 77, 64, True),
                                                             (37, 24, 1000, 8, False)])
def test_fused_linear_ce_matches_reference(monkeypatch, kernels, dtype, softcap, n, hdim, vocab, chunk, compact):
    """compact=False (every row through the GEMMs, as under CUDA graph capture) gives the same loss and grads."""
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    torch.manual_seed(3)
    h = torch.randn(n, hdim, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, hdim, device=DEVICE) * 0.2).to(dtype)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[::5] = -100
    ours = _grads(lambda *a: _FusedLinearCrossEntropy.apply(*a, compact), h, w, y, softcap, chunk)
    ref = _grads(linear_cross_entropy_reference, h, w, y, softcap, chunk)
    exact = _grads(linear_cross_entropy_reference, h.double(), w.double(), y, softcap, chunk)
    for name, a, b, e in zip(("loss", "dh", "dw"), ours, ref, exact):
        assert_as_good_as_reference(a, b, e, dtype, name)
    assert ours[1][::5].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("compact", [True, False])
def test_fused_ce_frozen_weight_and_all_ignored(monkeypatch, kernels, compact):
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8)
    y = torch.full((6,), -100)
    loss = _FusedLinearCrossEntropy.apply(h, w, y, None, 4, compact)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0


@pytest.mark.skipif(not HAVE_TRITON, reason="no triton")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("rows, vocab, block", [(37, 1000, None), (37, 1000, 256), (5, 77, None), (5, 77, 32)])
def test_ce_chunk_kernel_matches_reference(dtype, softcap, rows, vocab, block):
    from fasttune.kernels.cross_entropy import _ce_chunk_grad_triton

    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype)
    y = torch.randint(0, vocab, (rows,), device=DEVICE)
    y[0], y[-1], y[1::3] = 0, vocab - 1, -100  # first/last class (block masking) and ignored rows
    ours, ref, exact = logits.clone(), logits.clone(), logits.double()
    loss = _ce_chunk_grad_triton(ours, y, softcap, block)  # a small block exercises the multi-block loop
    ref_loss = _ce_chunk_grad_reference(ref, y, softcap)
    exact_loss = _ce_chunk_grad_reference(exact, y, softcap)
    assert loss.dtype == ref_loss.dtype == torch.float32 and ours.dtype == dtype
    assert_as_good_as_reference(loss, ref_loss, exact_loss, dtype, "loss")
    assert_as_good_as_reference(ours, ref, exact, dtype, "grad")
    assert ours[1::3].abs().max() == 0
    # the gradient rows of softmax - onehot sum to 0 (the softcap derivative breaks that)
    if softcap is None:
        assert ours.double().sum(1).abs().max() < 1e-2


def test_lm_head_gradient_tiles_equal_one_product(monkeypatch):
    """d(lm_head) accumulated in vocab tiles (bounded temporaries) equals the untiled fp32 sum."""
    import fasttune.kernels.cross_entropy as ce

    torch.manual_seed(5)
    acc, a, b = torch.zeros(37, 6), torch.randn(37, 11), torch.randn(11, 6)
    monkeypatch.setattr(ce, "GRAD_W_TILE_ROWS", 8)
    ce._accumulate_fp32(acc, a, b)
    torch.testing.assert_close(acc, a @ b)


def _stats_oracle(logits64, y, softcap):
    """[entropy sum, first-argmax hits] over labelled rows, in fp64 on the full logits."""
    z = torch.tanh(logits64 / softcap) * softcap if softcap else logits64
    logp = z.log_softmax(-1)
    valid = y != -100
    ent = -(logp.exp() * logp).sum(-1)
    return torch.stack([ent[valid].sum(), ((z.argmax(-1) == y) & valid).sum().double()])


@pytest.mark.parametrize("chunk_fn", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="no triton"))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunk_token_stats_and_ties(chunk_fn, softcap, dtype):
    """The chunk math's stats (TRL's SFT entropy and mean_token_accuracy): entropies of labelled rows and first-argmax
    hits, over several vocab blocks; a label tied with an earlier maximum is no hit, tied with a later one is."""
    from fasttune.kernels.cross_entropy import _ce_chunk_grad_triton

    torch.manual_seed(1)
    logits = (torch.randn(9, 100) * 3).to(dtype)
    y = logits.argmax(-1)  # hits
    y[1] = (y[1] + 1) % 100  # a miss
    y[2] = -100  # ignored, though its argmax would hit
    logits[3, [10, 70]] = 50.0  # tied maxima at 10 and 70 (in different 32-wide blocks)
    logits[4, [10, 70]] = 50.0
    y[3], y[4] = 70, 10  # tied with an earlier max: no hit; the first of the tie: a hit
    stats = torch.zeros(2, device=DEVICE)
    logits, y = logits.to(DEVICE), y.to(DEVICE)
    g = logits.clone()
    if chunk_fn == "triton":
        _ce_chunk_grad_triton(g, y, softcap, block=32, stats=stats)
    else:
        _ce_chunk_grad_reference(g, y, softcap, stats)
    want = _stats_oracle(logits.double(), y, softcap)
    assert want[1] == 6  # rows 0, 4, 5, 6, 7, 8
    torch.testing.assert_close(stats.double(), want, rtol=1e-5, atol=1e-4)
    assert g.dtype == dtype  # the gradient is written in place, as without stats


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("grad", [True, False])
def test_linear_ce_stats_on_every_path(monkeypatch, kernels, grad):
    """chunked_linear_cross_entropy(stats=...) through the fused path (grad) and the checkpointed / no-grad reference
    path gives the same stats as full fp64 logits, several chunks, some rows ignored; the loss is unchanged."""
    from fasttune.kernels.cross_entropy import chunked_linear_cross_entropy

    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    torch.manual_seed(2)
    h = torch.randn(21, 16, requires_grad=grad)
    w = torch.randn(90, 16)
    y = torch.randint(0, 90, (21,))
    y[::4] = -100
    y[1] = (h.detach() @ w.t()).argmax(-1)[1]  # at least one hit
    stats = torch.zeros(2)
    loss = chunked_linear_cross_entropy(h, w, y, 5.0, chunk_tokens=4, stats=stats)
    torch.testing.assert_close(loss, chunked_linear_cross_entropy(h, w, y, 5.0, chunk_tokens=4))
    want = _stats_oracle(h.detach().double() @ w.double().t(), y, 5.0)
    assert want[1] >= 1
    torch.testing.assert_close(stats.double(), want, rtol=1e-5, atol=1e-4)


def _dft_oracle(h, w, y, softcap):
    """Dynamic Fine-Tuning's loss sum from full fp64 logits: each label's cross-entropy times its probability,
    detached (TRL's SFT loss_type="dft")."""
    z = h @ w.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ce = torch.nn.functional.cross_entropy(z, y, ignore_index=-100, reduction="none")
    return (ce * torch.exp(-ce).detach()).sum()


def _variant_inputs(seed):
    """fp64 hidden (29, 16), head (300, 16) and labels with every 4th row ignored."""
    torch.manual_seed(seed)
    h = torch.randn(29, 16, device=DEVICE, dtype=torch.float64)
    w = torch.randn(300, 16, device=DEVICE, dtype=torch.float64) * 0.3
    y = torch.randint(0, 300, (29,), device=DEVICE)
    y[::4] = -100
    return h, w, y


def _assert_paths_equal_oracle(oracle, h, w, paths):
    """Each path(hidden, head) in fp32 gives oracle(hidden, head)'s fp64 loss sum and gradients (upstream 0.37);
    returns (the oracle's loss, its hidden gradient)."""
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = oracle(h64, w64)
    (want * 0.37).backward()
    for fn in paths:
        a, b = h.float().requires_grad_(), w.float().requires_grad_()
        loss = fn(a, b)
        (loss * 0.37).backward()
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    return want.detach(), h64.grad


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("compact", [True, False])
def test_dft_weighting_on_every_path(monkeypatch, kernels, softcap, compact):
    """dft=True: the fused path (Triton chunk kernel or torch chunk math) and the checkpointed reference give the
    fp64 oracle's loss and gradients of hidden and head."""
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    h, w, y = _variant_inputs(5)
    want = _assert_paths_equal_oracle(lambda a, b: _dft_oracle(a, b, y, softcap), h, w, (
        lambda a, b: _FusedLinearCrossEntropy.apply(a, b, y, softcap, 8, compact, None, True),
        lambda a, b: linear_cross_entropy_reference(a, b, y, softcap, 8, None, True)))[0]
    plain = linear_cross_entropy_reference(h.float(), w.float(), y, softcap, 8)
    assert float(plain) > float(want) * 1.5  # the weighting acts (probabilities well below 1)


def _smoothing_oracle(h, w, y, softcap, eps):
    """transformers' own LabelSmoother (its mean over the labelled rows, times their count) on fp64 logits."""
    from transformers.trainer_pt_utils import LabelSmoother

    z = h @ w.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return LabelSmoother(epsilon=eps)((z[None],), y[None]) * (y != -100).sum()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("eps", [0.1, 0.35])
def test_label_smoothing_on_every_path(monkeypatch, kernels, softcap, compact, eps):
    """label_smoothing=e: the fused path (Triton chunk kernel or torch chunk math), the checkpointed reference and
    cross_entropy_sum (the fallback's) give transformers' LabelSmoother's loss and gradients of hidden and head."""
    from fasttune.kernels.cross_entropy import cross_entropy_sum

    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    h, w, y = _variant_inputs(6)
    _, h_grad = _assert_paths_equal_oracle(lambda a, b: _smoothing_oracle(a, b, y, softcap, eps), h, w, (
        lambda a, b: _FusedLinearCrossEntropy.apply(a, b, y, softcap, 8, compact, None, False, eps),
        lambda a, b: linear_cross_entropy_reference(a, b, y, softcap, 8, None, False, eps),
        lambda a, b: cross_entropy_sum(torch.tanh(a @ b.t() / softcap) * softcap if softcap else a @ b.t(), y,
                                       label_smoothing=eps)))
    a = h.float().requires_grad_()
    linear_cross_entropy_reference(a, w.float(), y, softcap, 8).mul(0.37).backward()
    assert (a.grad.double() - h_grad).abs().max() > 0.05 * h_grad.abs().max()  # the smoothing acts
    with pytest.raises(ValueError, match="do not combine"):
        linear_cross_entropy_reference(h, w, y, softcap, 8, None, True, eps)
