"""kernels/delta_chunk.py: the chunked delta rule with its written-out backward against autograd through the same
rule in plain torch ops (chunked_rule_reference): outputs, final state and the gradients of q, k, v, beta, g and the
initial state, with the scan as a torch loop and as the Triton kernels (the interpreter on a CPU), with packed-run
resets; the series inverse against an fp64 inverse."""
import pytest
import torch

from fasttune.kernels.delta_chunk import chunked_rule, chunked_rule_reference, unit_lower_inverse
from fasttune.kernels.delta_scan import ScanConfig
from kernel_check import dtypes_for_device

DEVICE, _ = dtypes_for_device()


def _inputs(b=2, h=3, n=3, c=16, dk=16, dv=32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    q, k = (torch.nn.functional.normalize(make(b, h, n, c, dk), dim=-1) for _ in range(2))
    q = q * dk ** -0.5
    v = make(b, h, n, c, dv)
    beta = torch.rand(b, h, n, c, device=DEVICE, generator=g)
    decay = -torch.rand(b, h, n, c, device=DEVICE, generator=g) * 0.5
    s0 = make(b, h, dk, dv) * 0.1
    return [x.requires_grad_() for x in (q, k, v, beta, decay, s0)]


@pytest.mark.parametrize("scan", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True])
def test_written_out_backward_equals_autograd(scan, packed):
    if scan == "triton" and DEVICE == "cpu":
        pytest.importorskip("triton")
    inputs = _inputs()
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    keep = torch.tensor([[1.0, 0, 1], [1.0, 1, 0]], device=DEVICE) if packed else None
    config = ScanConfig(16, 4, 1, "ieee") if scan == "triton" else None
    got = chunked_rule(*inputs, keep, config)
    want = chunked_rule_reference(*twins, keep)
    grads = [torch.randn_like(x) for x in want]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, grads)
    names = ["o", "final", "dq", "dk", "dv", "dbeta", "dg", "ds0"]
    pairs = [*zip(got, want), *((x.grad, y.grad) for x, y in zip(inputs, twins))]
    for name, (a, e) in zip(names, pairs):
        err = ((a - e).norm() / e.norm()).item()  # fp32 products in another order: ~1e-7
        assert err < 1e-5, (name, err)


def test_unit_lower_inverse_equals_an_fp64_inverse():
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(3, 2, 64, 64, generator=g) * 0.1).tril(-1)
    exact = torch.linalg.inv(torch.eye(64, dtype=torch.float64) + a.double())
    assert ((unit_lower_inverse(a).double() - exact).norm() / exact.norm()).item() < 1e-6


def _saved_bytes(fn, inputs) -> int:
    """Bytes of the distinct storages autograd keeps for fn's backward."""
    seen = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(*inputs)
    return sum(seen.values())


def test_keeps_less_for_backward_than_autograd():
    """What a layer holds between its forward and backward (all of it, for every layer, without recompute): the
    inputs, M, W and the scan's states and values, not autograd's dozen intermediates."""
    b, h, n, c, dk, dv = 1, 4, 4, 64, 32, 16
    inputs = _inputs(b, h, n, c, dk, dv)
    ours = _saved_bytes(lambda *x: chunked_rule(*x), inputs)
    chunks = b * h * n * 4  # fp32 bytes per chunk position
    # q, k, W (C x d_k); v, values (C x d_v); M (C x C); beta, G (C); the states (d_k x d_v)
    assert ours == chunks * (c * (3 * dk + 2 * dv + c + 2) + dk * dv), ours
    assert ours < 0.25 * _saved_bytes(lambda *x: chunked_rule_reference(*x), inputs)
