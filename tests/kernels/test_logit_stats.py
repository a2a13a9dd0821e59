"""kernels/logit_stats.py: the one-pass row statistics (log-sum-exp, label logit, entropy, mean logit, first-argmax
hit, log sum p^2) of the Triton kernel equal the torch reference on the same logits (fp64 for the reference), with
softcap and temperature, rows longer than one block, and ties."""
import pytest
import torch

from fasttune.kernels.dispatch import HAVE_TRITON
from fasttune.kernels.logit_stats import logit_row_stats, logit_row_stats_reference
from kernel_check import dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.skipif(not HAVE_TRITON, reason="no triton")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (30.0, 0.7)])
@pytest.mark.parametrize("vocab", [300, 5000])
def test_kernel_equals_reference(monkeypatch, dtype, softcap, temperature, vocab):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(9, vocab, generator=g) * 4).to(dtype)
    x[2, 17] = x[2, vocab - 5] = x[2].max() + 1  # a tie: the label at the later column is a miss
    labels = torch.randint(0, vocab, (9,), generator=g)
    labels[0] = x[0].argmax()
    labels[2] = vocab - 5
    x, labels = x.to(DEVICE), labels.to(DEVICE)
    got = logit_row_stats(x, labels, softcap, temperature, entropy=True, extras=True)
    want = logit_row_stats_reference(x.double(), labels, softcap, temperature, entropy=True, extras=True)
    assert got.dtype == torch.float32 and want[0, 4] == 1 and want[2, 4] == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    only = logit_row_stats(x, labels, softcap, temperature)
    torch.testing.assert_close(only[:, :2], got[:, :2], rtol=0, atol=0)
    assert not only[:, 2:].any()


def test_empty_and_reference_dispatch(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    x, y = torch.randn(3, 10, dtype=torch.float64), torch.tensor([1, 2, 3])
    torch.testing.assert_close(logit_row_stats(x, y, entropy=True)[:, 0], torch.logsumexp(x, -1))
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    assert logit_row_stats(x[:0].float(), y[:0]).shape == (0, 6)
