"""kernels/tf32.py: TF32 products inside the block (on CUDA measurably coarser than IEEE: the switch took effect),
torch's setting restored after, in its legacy API and in the newer one."""
import subprocess
import sys

import torch

from fasttune.kernels.tf32 import tf32_products
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
