"""GGML quantizers on the GPU give the same bytes as on the CPU, where tests/export/test_kquants.py checks them
against ggml's own quantizers (skipped without CUDA). Measured on an H200: equal for weight-like inputs (below);
K-type blocks of extreme inputs differ (values near 1e15, where the weighted fits overflow, and blocks holding only
the values 0 and 1, where candidate fits tie), so those are not asserted here."""
import pytest
import torch

from fasttune.export import kquants

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs():
    g = torch.Generator().manual_seed(0)
    shape = (64, 1024)
    special = torch.zeros(4, 1024)
    special[1] = 0.3
    special[2] = -torch.rand(1024, generator=g)
    special[3] = torch.randn(1024, generator=g) * 1e-30
    return {"normal": torch.randn(*shape, generator=g) * 0.02,
            "grid": torch.randint(-8, 8, shape, generator=g).float() * 0.125,
            "bf16": (torch.randn(*shape, generator=g) * 0.05).bfloat16().float(),
            "outliers": torch.randn(*shape, generator=g) * (1 + 50 * (torch.rand(*shape, generator=g) < 0.002)),
            "special": special}


@pytest.mark.parametrize("qtype", sorted(kquants.QUANTIZERS))
def test_gpu_bytes_equal_cpu_bytes(qtype):
    for name, x in _inputs().items():
        cpu = kquants.quantize(x, qtype)
        gpu = kquants.quantize(x.cuda(), qtype)
        assert (cpu == gpu).all(), f"{qtype} {name}: {(cpu != gpu).any(axis=1).mean():.2%} of rows differ"


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", "Q4_K"])
def test_gpu_weighted_bytes_equal_cpu_bytes(qtype):
    """With an importance matrix too (the IQ4 search weighs by qw * sqrt(sigma2 + x^2))."""
    qw = torch.rand(1024, generator=torch.Generator().manual_seed(1)) ** 3
    for name, x in _inputs().items():
        cpu = kquants.quantize(x, qtype, qw)
        gpu = kquants.quantize(x.cuda(), qtype, qw)
        assert (cpu == gpu).all(), f"{qtype} {name}: {(cpu != gpu).any(axis=1).mean():.2%} of rows differ"
