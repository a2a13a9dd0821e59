import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device, run_with_grads

pytest.importorskip("triton")
from fasttune.kernels.activations import ACT_IDS, _GatedActFunction, gated_act_reference  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("shape", [(3, 123), (2, 5, 300)])
def test_gated_act_matches_reference(dtype, act, shape):
    torch.manual_seed(1)
    g, u, dy = (torch.randn(shape, device=DEVICE).mul(2).to(dtype) for _ in range(3))
    ours, (dg, du) = run_with_grads(lambda a, b: _GatedActFunction.apply(a, b, ACT_IDS[act]), [g, u], dy)
    ref, (rdg, rdu) = run_with_grads(lambda a, b: gated_act_reference(a, b, act), [g, u], dy)
    ex, (edg, edu) = run_with_grads(lambda a, b: gated_act_reference(a, b, act), [g.double(), u.double()],
                                    dy.double())
    assert_as_good_as_reference(ours, ref, ex, dtype, "y")
    assert_as_good_as_reference(dg, rdg, edg, dtype, "dgate")
    assert_as_good_as_reference(du, rdu, edu, dtype, "dup")
