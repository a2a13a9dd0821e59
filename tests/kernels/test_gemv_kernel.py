import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.gemv import (  # noqa: E402
    gated_gemv, gated_gemv_reference, gemv, gemv_reference, one_row_linears)

DEVICE, DTYPES = dtypes_for_device()


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes, k", [([48], 64), ([37, 9, 9], 100), ([256, 64], 1100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype, sizes, k, bias):
    torch.manual_seed(0)
    x = _rand(1, 1, k, dtype=dtype)
    ws = [_rand(n, k, dtype=dtype) / k ** 0.5 for n in sizes]
    bs = [_rand(n, dtype=dtype) if bias else None for n in sizes]
    ours = gemv(x, ws, bs)
    ref = gemv_reference(x, ws, bs)
    exact = gemv_reference(x.double(), [w.double() for w in ws], [b.double() if bias else None for b in bs])
    assert [o.shape for o in ours] == [(1, 1, n) for n in sizes]
    for o, r, e in zip(ours, ref, exact):
        assert o.dtype == dtype
        assert_as_good_as_reference(o, r, e, dtype, f"{sizes}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("n, k, bias", [(48, 64, False), (37, 1100, True)])
def test_gated_gemv_matches_two_linears_and_the_activation(dtype, act, n, k, bias):
    torch.manual_seed(1)
    x = _rand(1, 1, k, dtype=dtype)
    wg, wu = (_rand(n, k, dtype=dtype) / k ** 0.5 for _ in range(2))
    bg, bu = (_rand(n, dtype=dtype) if bias else None for _ in range(2))
    ours = gated_gemv(x, wg, wu, bg, bu, act)
    ref = gated_gemv_reference(x, wg, wu, bg, bu, act)
    exact = gated_gemv_reference(*(t.double() if t is not None else None for t in (x, wg, wu, bg, bu)), act)
    assert ours.shape == (1, 1, n) and ours.dtype == dtype
    assert_as_good_as_reference(ours, ref, exact, dtype, act)
    if dtype == torch.float32:  # the same roundings as the unfused path
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bad_calls_raise():
    x = torch.randn(1, 8, device=DEVICE)
    with pytest.raises(ValueError):
        gemv(torch.randn(2, 8, device=DEVICE), [torch.randn(4, 8, device=DEVICE)], [None])
    with pytest.raises(ValueError):
        gemv(x, [torch.randn(4, 8, device=DEVICE)] * 4, [None] * 4)
    w = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unsupported activation"):
        gated_gemv(x, w, w, None, None, "relu")
    with pytest.raises(ValueError, match="same shape"):
        gated_gemv(x, w, w[:3], None, None, "silu")


def test_one_row_linears_only_for_what_gemv_computes(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    lin = [torch.nn.Linear(8, 4, device=DEVICE), torch.nn.Linear(8, 6, device=DEVICE)]
    x = torch.randn(1, 1, 8, device=DEVICE)
    with torch.no_grad():
        assert one_row_linears(x, lin)
        assert one_row_linears(x, lin[:1])
        assert not one_row_linears(torch.randn(2, 1, 8, device=DEVICE), lin)  # two rows: a GEMM's job
        assert not one_row_linears(x, lin * 2)  # four weights
        assert not one_row_linears(x, [torch.nn.Linear(16, 4, device=DEVICE)])  # K differs from x's
        assert not one_row_linears(x.half(), lin)  # dtype differs from the weights
        lin[1].bias = None
        assert not one_row_linears(x, lin)  # bias on one only
    lin[0].bias = None
    assert not one_row_linears(x, lin)  # autograd on: training uses the ordinary path
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    with torch.no_grad():
        assert not one_row_linears(x, lin)
