import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device, run_with_grads

pytest.importorskip("triton")
from fasttune.kernels.rope import _RopeFunction, apply_rope_reference, rope_cos_sin, rope_inv_freq  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, h, d, rot", [(2, 5, 3, 16, 16), (1, 7, 5, 24, 12), (3, 2, 1, 8, 8)])
def test_rope_matches_reference(dtype, b, t, h, d, rot):
    torch.manual_seed(2)
    pos = torch.randint(0, 500, (b, t), device=DEVICE)  # packed-style, non-monotonic positions
    cos, sin = rope_cos_sin(rope_inv_freq(rot, 10000.0).to(DEVICE), pos, torch.float64)
    x = torch.randn(b, t, h, d, device=DEVICE).to(dtype)
    dy = torch.randn(b, t, h, d, device=DEVICE).to(dtype)
    c, s = cos.to(dtype), sin.to(dtype)
    ours, (dx,) = run_with_grads(lambda a: _RopeFunction.apply(a, c, s), [x], dy)
    ref, (rdx,) = run_with_grads(lambda a: apply_rope_reference(a, c, s), [x], dy)
    ex, (edx,) = run_with_grads(lambda a: apply_rope_reference(a, cos, sin), [x.double()], dy.double())
    assert_as_good_as_reference(ours, ref, ex, dtype, "y")
    assert_as_good_as_reference(dx, rdx, edx, dtype, "dx")
