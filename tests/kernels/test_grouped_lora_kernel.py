"""kernels/grouped_lora.py: the per-expert weight gradient x_e^T @ dy_e against the torch loop and fp64 (empty
experts, ranks below the 16-wide tile, strided outputs), and the LoRA grouped GEMM's gradients against autograd
through the plain product."""
import pytest
import torch

from fasttune.kernels.dispatch import HAVE_TRITON
from fasttune.kernels.grouped_lora import grouped_weight_grad, grouped_weight_grad_reference, lora_grouped_mm
from kernel_check import dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="no triton")


def _offsets(counts):
    return torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, q, counts", [(96, 8, [5, 0, 70, 1]), (8, 200, [64, 3, 0, 0]), (32, 32, [130, 2])])
def test_weight_grad_matches_reference(monkeypatch, dtype, p, q, counts):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.manual_seed(0)
    s = sum(counts)
    x, dy = torch.randn(s, p, device=DEVICE).to(dtype), torch.randn(s, q, device=DEVICE).to(dtype)
    offsets = _offsets(counts)
    got = grouped_weight_grad(x, dy, offsets, torch.empty(len(counts), p, q, device=DEVICE, dtype=dtype))
    ref = grouped_weight_grad_reference(x, dy, offsets, torch.empty(len(counts), p, q, device=DEVICE, dtype=dtype))
    exact = grouped_weight_grad_reference(x.double(), dy.double(), offsets,
                                          torch.empty(len(counts), p, q, device=DEVICE, dtype=torch.float64))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - exact).abs().max() <= tol * exact.abs().max() + 1e-6)
    assert ((got.double() - exact).norm() <= 1.5 * (ref.double() - exact).norm() + tol * exact.norm())
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert all(got[e].abs().max() == 0 for e in empty)


def test_weight_grad_into_a_transposed_view(monkeypatch):
    """lora_A's view (E, in, r) of an (E, r, in) tensor: the gradient lands in that layout."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    x, dy = torch.randn(40, 48, device=DEVICE), torch.randn(40, 16, device=DEVICE)
    offsets = _offsets([10, 30])
    out = torch.empty(2, 16, 48, device=DEVICE).transpose(1, 2)
    grouped_weight_grad(x, dy, offsets, out)
    want = grouped_weight_grad_reference(x, dy, offsets, torch.empty(2, 48, 16, device=DEVICE))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _loop_mm(x, w, offs):
    """The grouped product by a loop over groups (torch._grouped_mm's signature): the autograd oracle."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[e])
        start = end
    return torch.cat(out)


def test_lora_grouped_mm_gradients_match_autograd(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.manual_seed(1)
    counts = [7, 0, 20, 5]
    offsets = _offsets(counts)
    x = torch.randn(32, 24, device=DEVICE, requires_grad=True)
    base = torch.randn(4, 8, 24, device=DEVICE)
    w = base.transpose(1, 2).detach().requires_grad_()  # (E, K, r) strided, as ExpertLora.factors gives it
    grad = torch.randn(32, 8, device=DEVICE)
    y = lora_grouped_mm(x, w, offsets, _loop_mm)
    y.backward(grad)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _loop_mm(x2, w2, offs=offsets).backward(grad)
    torch.testing.assert_close(y, _loop_mm(x2, w2, offs=offsets).detach())
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    assert w.grad.stride() == w.stride()
