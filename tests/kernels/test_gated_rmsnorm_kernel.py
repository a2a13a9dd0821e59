"""kernels/gated_rmsnorm.py: the Triton grouped gated RMSNorm (the interpreter on a CPU) against the torch reference
and fp64: output, d(y), d(z) and d(w), for the norm after the gate (Mamba-2) and before it (Falcon-H1), one and
several groups, widths that are not powers of two, and z read in place from a wider tensor (in_proj's output)."""
import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.gated_rmsnorm import _GatedRMSNormFunction, gated_rms_norm, gated_rms_norm_reference  # noqa: E402,E501

DEVICE, DTYPES = dtypes_for_device()


def _grads(fn, y, z, w, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (y, z, w)]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,width", [(1, 96), (4, 40), (2, 64)])
@pytest.mark.parametrize("before_gate", [False, True])
def test_matches_reference(dtype, groups, width, before_gate):
    torch.manual_seed(0)
    dim = groups * width
    y = torch.randn(3, 5, dim, device=DEVICE)  # the scan's output: fp32
    wide = torch.randn(3, 5, dim + 24, device=DEVICE).to(dtype)
    z = wide[..., 7:7 + dim]  # a slice of a wider tensor, as in_proj's gate
    w = (torch.randn(dim, device=DEVICE) * 0.1 + 1).to(dtype)
    dout = torch.randn(3, 5, dim, device=DEVICE).to(dtype)
    ours = _grads(lambda a, b, c: _GatedRMSNormFunction.apply(a, b, c, groups, 1e-5, before_gate, dtype), y, z, w,
                  dout)
    ref = _grads(lambda a, b, c: gated_rms_norm_reference(a, b, c, groups, 1e-5, before_gate).to(dtype), y, z, w,
                 dout)
    ex = _grads(lambda a, b, c: gated_rms_norm_reference(a, b, c, groups, 1e-5, before_gate),
                y.double(), z.double(), w.double(), dout.double())
    for name, a, b, e in zip(["out", "dy", "dz", "dw"], ours, ref, ex):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_as_good_as_reference(a, b, e, dtype, name)


def test_dispatch_and_empty_rows(monkeypatch):
    """The torch reference under FASTTUNE_KERNELS=torch (cast to out_dtype), the kernels under triton; no rows."""
    y, z, w = torch.randn(2, 32), torch.randn(2, 32), torch.ones(32)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    ref = gated_rms_norm(y, z, w, 2, 1e-6, out_dtype=torch.float16)
    assert ref.dtype == torch.float16
    torch.testing.assert_close(ref, gated_rms_norm_reference(y, z, w, 2, 1e-6).half())
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.testing.assert_close(gated_rms_norm(y, z, w, 2, 1e-6, out_dtype=torch.float16), ref)
    assert gated_rms_norm(y[:0], z[:0], w, 2, 1e-6).shape == (0, 32)
