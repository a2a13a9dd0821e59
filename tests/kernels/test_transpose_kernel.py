"""kernels/transpose.py: the outer/inner swap with a cast equals torch's permute + copy (odd sizes, fp32 -> 16-bit
and back), and its gradient comes back in the source's layout and dtype."""
import pytest
import torch

from fasttune.kernels.dispatch import HAVE_TRITON
from fasttune.kernels.transpose import swap_outer, swap_outer_reference
from kernel_check import dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="no triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(70, 3, 5), (1, 16, 130), (128, 1, 64)])
def test_swap_outer_equals_permute_copy(monkeypatch, dtype, shape):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    x = torch.randn(*shape, device=DEVICE)
    got = swap_outer(x, dtype)
    assert got.is_contiguous() and got.dtype == dtype and got.shape == shape[::-1]
    assert torch.equal(got, swap_outer_reference(x, dtype))


def test_swap_outer_gradient(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    x = torch.randn(9, 4, 33, device=DEVICE, requires_grad=True)
    grad = torch.randn(33, 4, 9, device=DEVICE)
    swap_outer(x, torch.float32).backward(grad)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, grad.permute(2, 1, 0))
