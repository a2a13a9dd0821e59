"""kernels/grouped_lora.py: the per-expert weight gradient x_e^T @ dy_e, the thin product x @ a_e and the in-place
rank-r add out += s low @ b_e (+ bias_e) against their torch loops and fp64 (empty experts, ranks below the 16-wide
tile and above one rank tile, strided factors, rows past the last group), and expert_lora_linear's output and
gradients against autograd through the plain per-expert product."""
import pytest
import torch

from fasttune.kernels.dispatch import HAVE_TRITON
from fasttune.kernels.grouped_lora import (expert_lora_linear, grouped_expand_add_, grouped_expand_add_reference,
                                           grouped_thin_mm, grouped_thin_mm_reference, grouped_weight_grad,
                                           grouped_weight_grad_reference)
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


def _exact_thin(x, w, offsets):
    """x[s] @ w[e(s)] in fp64, by an explicit per-row expert index (independent of the references' group walk)."""
    expert = torch.bucketize(torch.arange(x.shape[0], device=x.device), offsets.long(), right=True)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
    live = expert < w.shape[0]
    out[live] = torch.bmm(x[live].double().unsqueeze(1), w.double()[expert[live]]).squeeze(1)
    return out, expert, live


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, r, counts, extra", [(96, 8, [5, 0, 70, 1], 0), (200, 16, [64, 3, 0, 0], 5),
                                                 (32, 70, [130, 2], 0), (40, 16, [3] + [0] * 40 + [90], 0)])
def test_thin_mm_matches_exact(monkeypatch, dtype, k, r, counts, extra):
    """`extra` rows after the last group (not owned by any expert) come out 0."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.manual_seed(0)
    offsets = _offsets(counts)
    x = torch.randn(sum(counts) + extra, k, device=DEVICE).to(dtype)
    w = torch.randn(len(counts), r, k, device=DEVICE).to(dtype).transpose(1, 2)  # lora_A's strided (E, K, r) view
    got = grouped_thin_mm(x, w, offsets)
    exact, _, _ = _exact_thin(x, w, offsets)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (x.shape[0], r)
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
    torch.testing.assert_close(grouped_thin_mm_reference(x, w, offsets).double(), exact, rtol=tol, atol=tol)
    if extra:
        assert got[-extra:].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, r, counts, bias", [(96, 8, [5, 0, 70, 1], True), (200, 16, [64, 3, 0, 0], False),
                                                (40, 70, [130, 2], True), (24, 8, [3] + [0] * 40 + [90], True)])
def test_expand_add_matches_exact(monkeypatch, dtype, n, r, counts, bias):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.manual_seed(0)
    offsets = _offsets(counts)
    s, e = sum(counts), len(counts)
    out = torch.randn(s, n, device=DEVICE).to(dtype)
    low = torch.randn(s, r, device=DEVICE).to(dtype)
    w = torch.randn(e, n, r, device=DEVICE).to(dtype).transpose(1, 2)  # a strided (E, r, N) operand
    b = torch.randn(e, n, device=DEVICE).to(dtype) if bias else None
    prod, expert, _ = _exact_thin(low, w, offsets)
    exact = out.double() + 0.5 * prod + (b.double()[expert] if bias else 0)
    got = grouped_expand_add_(out.clone(), low, w, offsets, 0.5, b)
    ref = grouped_expand_add_reference(out.clone(), low, w, offsets, 0.5, b)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
    assert (ref.double() - exact).abs().max() <= tol * exact.abs().max()


def _loop_linear(x, weight, a, b, scale, offsets, bias):
    """The plain per-expert product, autograd's oracle: x_e @ W_e + scale * x_e @ a_e @ b_e (+ bias_e)."""
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        y = x[start:end] @ weight[e] + scale * (x[start:end] @ a[e]) @ b[e]
        out.append(y + bias[e] if bias is not None else y)
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("bias", [False, True])
def test_expert_lora_linear_matches_autograd(monkeypatch, bias):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    torch.manual_seed(1)
    counts, k, n, r = [7, 0, 20, 5], 24, 40, 8
    offsets = _offsets(counts)
    s, e = sum(counts), len(counts)
    x = torch.randn(s, k, device=DEVICE, requires_grad=True)
    weight = torch.randn(e, n, k, device=DEVICE)  # (E, out, in), frozen; the callable hands the (E, K, N) view
    a = torch.randn(e, r, k, device=DEVICE).transpose(1, 2).detach().requires_grad_()  # as ExpertLora.factors
    b = torch.randn(e, r, n, device=DEVICE, requires_grad=True)
    bias_t = torch.randn(e, n, device=DEVICE) if bias else None
    calls = []

    def dense(dtype):
        calls.append(dtype)
        return weight.to(dtype).transpose(1, 2)

    def mm(x_, w_, offs, counts_):  # the base's grouped GEMM, as a loop
        return torch.cat([x_[start:end] @ w_[e] for e, (start, end) in
                          enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])

    grad = torch.randn(s, n, device=DEVICE)
    y = expert_lora_linear(x, dense, mm, a, b, 0.75, offsets, torch.tensor(counts, device=DEVICE), bias_t)
    y.backward(grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    want = _loop_linear(x2, weight.transpose(1, 2), a2, b2, 0.75, offsets, bias_t)
    want.backward(grad)
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)
    assert a.grad.stride() == a.stride() and len(calls) == 2  # the base is materialised again in backward


def test_no_rows(monkeypatch):
    """A batch with no routed rows (S = 0) goes through all three products and their gradients."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    offsets = _offsets([0, 0])
    x = torch.zeros(0, 24, device=DEVICE, requires_grad=True)
    a = torch.randn(2, 24, 4, device=DEVICE, requires_grad=True)
    b = torch.randn(2, 4, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(2, 24, 8, device=DEVICE)
    y = expert_lora_linear(x, lambda dtype: weight.to(dtype), lambda x_, w_, o, c: x_.new_zeros(0, w_.shape[2]),
                           a, b, 2.0, offsets, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    y.sum().backward()
    assert y.shape == (0, 8) and a.grad.abs().max() == 0 and b.grad.abs().max() == 0
