import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device, run_with_grads

pytest.importorskip("triton")
from fasttune.kernels.rmsnorm import _RMSNormFunction, rms_norm_reference  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 123), (7, 64), (2, 1, 33)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_matches_reference(dtype, shape, offset):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (torch.randn(shape[-1], device=DEVICE) * 0.1 + (0 if offset else 1)).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ours, (dx, dw) = run_with_grads(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6, offset), [x, w], dy)
    ref, (rdx, rdw) = run_with_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset), [x, w], dy)
    ex, (edx, edw) = run_with_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset),
                                    [x.double(), w.double()], dy.double())
    assert ours.dtype == ref.dtype
    assert_as_good_as_reference(ours, ref, ex, dtype, "y")
    assert_as_good_as_reference(dx, rdx, edx, dtype, "dx")
    assert_as_good_as_reference(dw, rdw, edw, dtype, "dw")
