"""kernels/tf32_matmul.py: values and gradients of a @ b (plain fp32 on a CPU, TF32 on CUDA: within TF32's rounding,
and measurably coarser than IEEE, so the switch took effect), torch's setting restored, batch dims checked."""
import pytest
import torch

from fasttune.kernels.tf32_matmul import tf32_matmul, tf32_products
from kernel_check import dtypes_for_device

DEVICE, _ = dtypes_for_device()


def test_values_and_gradients():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(3, 5, 64, 96, device=DEVICE, generator=g, requires_grad=True)
    b = torch.randn(3, 5, 96, 48, device=DEVICE, generator=g, requires_grad=True)
    grad = torch.randn(3, 5, 64, 48, device=DEVICE, generator=g)
    got = tf32_matmul(a, b)
    got_grads = torch.autograd.grad(got, (a, b), grad)
    exact = a.double() @ b.double()
    exact_grads = torch.autograd.grad(exact, (a, b), grad.double())
    ieee = a.detach() @ b.detach()
    err = lambda x, e: ((x.double() - e).norm() / e.norm()).item()  # noqa: E731
    for x, e in [(got, exact), *zip(got_grads, exact_grads)]:
        assert err(x, e) < (2e-3 if DEVICE == "cuda" else 1e-6)
    if DEVICE == "cuda":  # TF32 products: well above fp32's ~1e-7
        assert err(got, exact) > 10 * err(ieee, exact)
    else:
        assert torch.equal(got, ieee)


def test_setting_restored_and_batch_dims_checked():
    torch.backends.cuda.matmul.allow_tf32 = False
    with tf32_products():
        assert torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
    tf32_matmul(torch.ones(2, 3, 4), torch.ones(2, 4, 5)).sum()
    assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError, match="equal batch dims"):
        tf32_matmul(torch.ones(2, 3, 4), torch.ones(4, 5))
