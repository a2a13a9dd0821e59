"""kernels/tf32.py: TF32 products inside the block (on CUDA measurably coarser than IEEE: the switch took effect),
torch's setting restored after, in its legacy API and in the newer one; tf32_matmul's values and gradients."""
import subprocess
import sys

import torch

import pytest

from fasttune.kernels.tf32 import _TF32Matmul, tf32_matmul, tf32_products
from kernel_check import dtypes_for_device

DEVICE, _ = dtypes_for_device()


def test_products_inside_and_setting_restored():
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a, b = (torch.randn(4, 64, 96, device=DEVICE, generator=g) for _ in range(2))
    b = b.transpose(-1, -2)
    exact = a.double() @ b.double()
    err = lambda x: ((x.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    with tf32_products():
        assert torch.backends.cuda.matmul.allow_tf32
        inside = a @ b
    assert not torch.backends.cuda.matmul.allow_tf32
    ieee = a @ b
    if DEVICE == "cuda":  # TF32 products: ~1e-4, well above fp32's ~1e-7
        assert 10 * err(ieee) < err(inside) < 2e-3
    else:  # no TF32 on a CPU
        assert torch.equal(inside, ieee)


def test_newer_api_setting_restored():
    """After a caller used torch's fp32_precision API torch refuses legacy reads; the block uses the newer API then
    (in a fresh process: the two APIs' state is process-wide)."""
    code = ("import torch\nfrom fasttune.kernels.tf32 import tf32_products\n"
            "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
            "with tf32_products():\n    assert torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
            "assert torch.backends.cuda.matmul.fp32_precision == 'ieee'\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_tf32_matmul_values_and_gradients():
    """The autograd function against a @ b: on CUDA within TF32's rounding (its backward products also TF32: coarser
    than IEEE), on a CPU exactly (no TF32 there); the plain product where not enabled; unequal batch dims refused."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    a, b = (torch.randn(3, 64, 32, device=DEVICE, generator=g) for _ in range(2))
    b = b.transpose(-1, -2).contiguous()
    da, db = (x.detach().clone().requires_grad_() for x in (a, b))
    ea, eb = (x.detach().double().requires_grad_() for x in (a, b))
    grad = torch.randn(3, 64, 64, device=DEVICE, generator=g)
    _TF32Matmul.apply(da, db).backward(grad)
    want = ea @ eb
    want.backward(grad.double())
    tolerance = 2e-3 if DEVICE == "cuda" else 1e-6
    for got, exact in [(_TF32Matmul.apply(a, b), want), (da.grad, ea.grad), (db.grad, eb.grad)]:
        assert ((got.double() - exact).norm() / exact.norm()).item() < tolerance
    assert torch.equal(tf32_matmul(a, b, enabled=False), a @ b)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="equal batch dims"):
            tf32_matmul(a, b[:1], enabled=True)
