import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device, run_with_grads

pytest.importorskip("triton")
from fasttune.kernels.activations import (  # noqa: E402
    ACT_IDS, _GatedActFunction, gated_act_packed, gated_act_reference)

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_packed_gated_act_matches_the_chunked_reference(monkeypatch, dtype, act):
    """gate_up (rows, 2I) read in place: output and the one (rows, 2I) gradient equal chunk + gated_act's."""
    torch.manual_seed(2)
    gate_up, dy = torch.randn(7, 2 * 150, device=DEVICE).mul(2).to(dtype), torch.randn(7, 150, device=DEVICE).to(dtype)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    ours, (d,) = run_with_grads(lambda t: gated_act_packed(t, act), [gate_up], dy)
    ref, (rd,) = run_with_grads(lambda t: gated_act_reference(*t.chunk(2, -1), act), [gate_up], dy)
    ex, (ed,) = run_with_grads(lambda t: gated_act_reference(*t.chunk(2, -1), act), [gate_up.double()], dy.double())
    assert ours.shape == (7, 150) and d.shape == gate_up.shape
    assert_as_good_as_reference(ours, ref, ex, dtype, "y")
    assert_as_good_as_reference(d, rd, ed, dtype, "dgate_up")


def test_packed_gated_act_refuses_odd_widths():
    with pytest.raises(ValueError, match="odd"):
        gated_act_packed(torch.randn(2, 5), "silu")
    with pytest.raises(ValueError, match="unsupported"):
        gated_act_packed(torch.randn(2, 4), "relu")
