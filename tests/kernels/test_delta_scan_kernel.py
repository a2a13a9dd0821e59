"""kernels/delta_scan.py: the chunk scan's Triton kernels against the torch loop, values and gradients of every
input (the initial state included), with dimensions below Triton's 16-wide dot tiles (masked) and above one d_v
block."""
import pytest
import torch

from fasttune.kernels import delta_scan
from fasttune.kernels.delta_scan import chunk_scan, chunk_scan_reference
from fasttune.kernels.dispatch import HAVE_TRITON
from kernel_check import dtypes_for_device

DEVICE, _ = dtypes_for_device()


@pytest.mark.skipif(not HAVE_TRITON, reason="no triton")
@pytest.mark.parametrize("c,dk,dv", [(16, 16, 8), (64, 24, 40)])
def test_kernel_equals_the_torch_loop(monkeypatch, c, dk, dv):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, h, n = 2, 3, 5
    w, k = (torch.randn(b, h, n, c, dk, device=DEVICE, generator=g) * 0.2 for _ in range(2))
    u = torch.randn(b, h, n, c, dv, device=DEVICE, generator=g)
    gamma = torch.rand(b, h, n, device=DEVICE, generator=g)
    s0 = torch.randn(b, h, dk, dv, device=DEVICE, generator=g)
    inputs = [x.requires_grad_() for x in (w, u, k, gamma, s0)]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    calls = []
    monkeypatch.setattr(delta_scan._ChunkScan, "apply", lambda *a: calls.append(1) or _apply(*a))
    got = chunk_scan(*inputs)
    want = chunk_scan_reference(*twins)
    assert calls  # the kernel ran
    grads = [torch.randn_like(x) for x in want]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, grads)
    for name, a, e in [*zip(["states", "v", "final"], got, want),
                       *((n, x.grad, y.grad) for n, x, y in zip(["dw", "du", "dk", "dgamma", "ds0"], inputs, twins))]:
        err = ((a - e).norm() / e.norm()).item()  # fp32 products in another order: ~1e-7
        assert err < 1e-5, (name, err)


_apply = delta_scan._ChunkScan.apply if HAVE_TRITON else None
