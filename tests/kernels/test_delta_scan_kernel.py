"""kernels/delta_scan.py: the chunk scan with its written-out backward against autograd through the torch loop,
values and gradients of every input (the initial state included), and the state resets of packed runs."""
import pytest
import torch

from fasttune.kernels.delta_scan import chunk_scan, chunk_scan_reference
from kernel_check import dtypes_for_device

DEVICE, _ = dtypes_for_device()


@pytest.mark.parametrize("c,dk,dv", [(16, 16, 8), (64, 24, 40)])
def test_scan_equals_the_torch_loop(c, dk, dv):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, h, n = 2, 3, 5
    w, k = (torch.randn(b, h, n, c, dk, device=DEVICE, generator=g) * 0.2 for _ in range(2))
    u = torch.randn(b, h, n, c, dv, device=DEVICE, generator=g)
    gamma = torch.rand(b, h, n, device=DEVICE, generator=g)
    s0 = torch.randn(b, h, dk, dv, device=DEVICE, generator=g)
    inputs = [x.requires_grad_() for x in (w, u, k, gamma, s0)]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    got = chunk_scan(*inputs)
    want = chunk_scan_reference(*twins)
    grads = [torch.randn_like(x) for x in want]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, grads)
    for name, a, e in [*zip(["states", "v", "final"], got, want),
                       *((n, x.grad, y.grad) for n, x, y in zip(["dw", "du", "dk", "dgamma", "ds0"], inputs, twins))]:
        err = ((a - e).norm() / e.norm()).item()  # fp32 products in another order: ~1e-7
        assert err < 1e-5, (name, err)



def test_keep_zeroes_the_state_where_a_run_starts():
    """keep (B, n): the torch form's values and gradients equal autograd through the loop with the resets."""
    g = torch.Generator().manual_seed(1)
    b, h, n, c, dk, dv = 2, 2, 6, 16, 8, 8
    inputs = [torch.randn(b, h, n, c, dk, generator=g) * 0.2, torch.randn(b, h, n, c, dv, generator=g),
              torch.randn(b, h, n, c, dk, generator=g) * 0.2, torch.rand(b, h, n, generator=g),
              torch.randn(b, h, dk, dv, generator=g)]
    keep = torch.tensor([[1.0, 1, 0, 1, 0, 1], [0.0, 1, 1, 1, 1, 0]])
    inputs = [x.requires_grad_() for x in inputs]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    got, want = chunk_scan(*inputs, keep=keep), chunk_scan_reference(*twins, keep=keep)
    assert (got[0][0, :, 2] == 0).all()  # row 0's third chunk starts from zero
    grads = [torch.randn_like(x) for x in want]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, grads)
    for a, e in [*zip(got, want), *((x.grad, y.grad) for x, y in zip(inputs, twins))]:
        assert ((a - e).norm() / e.norm()).item() < 1e-5
