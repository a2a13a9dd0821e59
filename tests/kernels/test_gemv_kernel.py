import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.gemv import gemv, gemv_reference, one_row_linears  # noqa: E402

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


def test_bad_calls_raise():
    x = torch.randn(1, 8, device=DEVICE)
    with pytest.raises(ValueError):
        gemv(torch.randn(2, 8, device=DEVICE), [torch.randn(4, 8, device=DEVICE)], [None])
    with pytest.raises(ValueError):
        gemv(x, [torch.randn(4, 8, device=DEVICE)] * 4, [None] * 4)


def test_one_row_linears_only_for_what_gemv_computes(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    lin = [torch.nn.Linear(8, 4, device=DEVICE), torch.nn.Linear(8, 6, device=DEVICE)]
    x = torch.randn(1, 1, 8, device=DEVICE)
    big = [torch.nn.Linear(2048, 2049, device=DEVICE) for _ in range(2)]  # 16.8 MB of fp32 each
    with torch.no_grad():
        assert one_row_linears(x, lin)
        assert not one_row_linears(torch.randn(2, 1, 8, device=DEVICE), lin)  # two rows: a GEMM's job
        assert not one_row_linears(x, lin[:1])  # one weight: cuBLAS's launch is as good
        assert not one_row_linears(x, lin * 2)  # four weights
        assert not one_row_linears(torch.randn(1, 2048, device=DEVICE), big)  # no small weight: cuBLAS is faster
        assert not one_row_linears(x.half(), lin)  # dtype differs from the weights
        lin[1].bias = None
        assert not one_row_linears(x, lin)  # bias on one only
    lin[0].bias = None
    assert not one_row_linears(x, lin)  # autograd on: training uses the ordinary path
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    with torch.no_grad():
        assert not one_row_linears(x, lin)
