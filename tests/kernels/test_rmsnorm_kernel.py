import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device, run_with_grads

pytest.importorskip("triton")
from fasttune.kernels.rmsnorm import _AddRMSNormFunction, _RMSNormFunction, add_rms_norm_reference, rms_norm_reference  # noqa: E402,E501

DEVICE, DTYPES = dtypes_for_device()


# (offset, fp32_scale): Llama's norm, Gemma's (1 + w), Gemma 4's w applied in fp32
VARIANTS = [(0.0, False), (1.0, False), (0.0, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 123), (7, 64), (2, 1, 33)])
@pytest.mark.parametrize("offset,fp32", VARIANTS)
def test_rmsnorm_matches_reference(dtype, shape, offset, fp32):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (torch.randn(shape[-1], device=DEVICE) * 0.1 + (0 if offset else 1)).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ours, (dx, dw) = run_with_grads(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6, offset, fp32)[0], [x, w], dy)
    ref, (rdx, rdw) = run_with_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, fp32), [x, w], dy)
    ex, (edx, edw) = run_with_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, fp32),
                                    [x.double(), w.double()], dy.double())
    assert ours.dtype == ref.dtype
    assert_as_good_as_reference(ours, ref, ex, dtype, "y")
    assert_as_good_as_reference(dx, rdx, edx, dtype, "dx")
    assert_as_good_as_reference(dw, rdw, edw, dtype, "dw")


def _add_norm_with_grads(fn, x, h, w, ds, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, h, w)]
    s, y = fn(*leaves)
    torch.autograd.backward([s, y], [ds, dy])
    return [s.detach(), y.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 123), (2, 1, 33)])
@pytest.mark.parametrize("offset,fp32", VARIANTS)
@pytest.mark.parametrize("with_h", [True, False])
def test_add_rmsnorm_matches_reference(dtype, shape, offset, fp32, with_h):
    """Residual add + norm in one kernel: s, norm(s), and d(x) = d(s) + the norm's input gradient (also d(h))."""
    torch.manual_seed(1)
    x, ds, dy = (torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3))
    h = torch.randn(shape, device=DEVICE).to(dtype) if with_h else None
    w = (torch.randn(shape[-1], device=DEVICE) * 0.1 + (0 if offset else 1)).to(dtype)
    ours = _add_norm_with_grads(lambda a, b, c: _AddRMSNormFunction.apply(a, b, c, 1e-6, offset, fp32)[:2],
                                x, h, w, ds, dy)
    ref = _add_norm_with_grads(lambda a, b, c: add_rms_norm_reference(a, b, c, 1e-6, offset, fp32), x, h, w, ds, dy)
    d = [t.double() if t is not None else None for t in (x, h, w, ds, dy)]
    ex = _add_norm_with_grads(lambda a, b, c: add_rms_norm_reference(a, b, c, 1e-6, offset, fp32), *d)
    names = ["s", "y", "dx"] + (["dh"] if with_h else []) + ["dw"]
    assert len(ours) == len(names)
    for name, a, b, e in zip(names, ours, ref, ex):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_as_good_as_reference(a, b, e, dtype, name)
