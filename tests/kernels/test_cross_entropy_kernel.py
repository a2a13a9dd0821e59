import pytest
import torch

from fasttune.kernels.cross_entropy import _FusedLinearCrossEntropy, linear_cross_entropy_reference
from kernel_check import assert_as_good_as_reference, dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()


def _grads(fn, h, w, y, softcap, chunk):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, y, softcap, chunk)
    (loss * 0.37).backward()  # a non-unit upstream gradient, as the GA normalisation gives
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("n, hdim, vocab, chunk", [(37, 24, 1000, 8), (16, 33, 77, 64)])
def test_fused_linear_ce_matches_reference(dtype, softcap, n, hdim, vocab, chunk):
    torch.manual_seed(3)
    h = torch.randn(n, hdim, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, hdim, device=DEVICE) * 0.2).to(dtype)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[::5] = -100
    ours = _grads(_FusedLinearCrossEntropy.apply, h, w, y, softcap, chunk)
    ref = _grads(linear_cross_entropy_reference, h, w, y, softcap, chunk)
    exact = _grads(linear_cross_entropy_reference, h.double(), w.double(), y, softcap, chunk)
    for name, a, b, e in zip(("loss", "dh", "dw"), ours, ref, exact):
        assert_as_good_as_reference(a, b, e, dtype, name)
    assert ours[1][::5].abs().max() == 0  # ignored rows get no gradient


def test_fused_ce_frozen_weight_and_all_ignored():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8)
    y = torch.full((6,), -100)
    loss = _FusedLinearCrossEntropy.apply(h, w, y, None, 4)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0
