"""kernels/clamped_swiglu.py: gpt-oss's clamped SwiGLU kernel against the torch reference (transformers'
_apply_gate), values and gradients, with inputs on both sides of the clamps; an odd width is refused."""
import pytest
import torch

from fasttune.kernels.clamped_swiglu import clamped_swiglu, clamped_swiglu_reference
from fasttune.kernels.dispatch import HAVE_TRITON
from kernel_check import dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.skipif(not HAVE_TRITON, reason="no triton")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference_values_and_gradients(monkeypatch, dtype):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.manual_seed(0)
    x = (torch.randn(3, 37, 2 * 50, device=DEVICE) * 6).to(dtype)  # |x| > limit = 7 in ~25% of entries
    assert (x[..., ::2] > 7).any() and (x[..., 1::2] < -7).any()
    grad = torch.randn(3, 37, 50, device=DEVICE).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.float().requires_grad_()
    y = clamped_swiglu(x1, 7.0, 1.702)
    want = clamped_swiglu_reference(x2, 7.0, 1.702)
    y.backward(grad)
    want.backward(grad.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert y.dtype == dtype and x1.grad.dtype == dtype
    torch.testing.assert_close(y.float(), want.detach(), **tol)
    torch.testing.assert_close(x1.grad.float(), x2.grad, **tol)
    assert (x1.grad[..., ::2][x[..., ::2] > 7] == 0).all() and (x1.grad[..., 1::2][x[..., 1::2].abs() > 7] == 0).all()


def test_odd_width_is_refused():
    with pytest.raises(ValueError, match="odd"):
        clamped_swiglu(torch.randn(2, 5), 7.0, 1.702)
