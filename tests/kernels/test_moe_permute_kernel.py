"""MoE permute/unpermute (kernels/moe_permute.py): the Triton gathers and their backward passes against the torch
references and fp64, with empty experts, H not a multiple of the column block, and k = 1."""
import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.moe_permute import (  # noqa: E402
    gather_sum_reference, group_by_expert, group_by_expert_reference, permute, unpermute)
from fasttune.models.moe import route  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


def _routing(n, e, k, seed=0):
    torch.manual_seed(seed)
    weights, experts = route(torch.randn(n, e, device=DEVICE), k, norm_topk_prob=True)
    return weights, experts.masked_fill(experts == 1, 0)  # expert 1 gets no pair: an empty group


@pytest.mark.parametrize("n,e,k", [(23, 6, 3), (1, 4, 2), (700, 130, 8), (5000, 3, 1)])
def test_group_by_expert_kernel_equals_the_reference(monkeypatch, n, e, k):
    """Blocks of 2048 pairs (5000 x 1), more experts than a power of two below them (130), one token."""
    _, experts = _routing(n, e, k)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    got = group_by_expert(experts, e)
    want = group_by_expert_reference(experts, e)
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    flat = experts.reshape(-1)
    assert torch.equal(flat[got.order][got.pos.reshape(-1)], flat)  # sorted row pos[n, j] is pair (n, j)
    assert got.counts[1] == 0 and int(got.offsets[-1]) == n * k


def _run(fn, leaves, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,e,k", [(37, 300, 5, 2), (16, 1100, 4, 4), (9, 64, 3, 1)])
def test_permute_and_unpermute_match_the_references(monkeypatch, dtype, n, h, e, k):
    """Forward and backward (x, the expert outputs and the routing weights) of the permute -> unpermute round trip
    with a per-row change in between, Triton vs torch, both against fp64."""
    weights, experts = _routing(n, e, k)
    groups = group_by_expert_reference(experts, e)
    order, pos = groups.order, groups.pos
    x = torch.randn(n, h, device=DEVICE).to(dtype)
    scale = torch.randn(n * k, 1, device=DEVICE).to(dtype)  # stands in for the experts: each row its own factor
    grad = torch.randn(n, h, device=DEVICE).to(dtype)

    def ref(x, w):  # plain autograd: x[order // k], then the weighted sum of each token's rows
        rows = x[order // k] * scale.to(x.dtype)
        return gather_sum_reference(rows, pos, w.to(x.dtype) if x.dtype == torch.float64 else w)

    def ours(x, w):
        return unpermute(permute(x, groups) * scale.to(x.dtype), pos, w)

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    got, (dx, dw) = _run(ours, [x, weights], grad)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    want, (rdx, rdw) = _run(ours, [x, weights], grad)
    exact, (edx, edw) = _run(ref, [x.double(), weights.double()], grad.double())
    assert got.dtype == dtype and dw.dtype == weights.dtype
    assert_as_good_as_reference(got, want, exact, dtype, "y")
    assert_as_good_as_reference(dx, rdx, edx, dtype, "dx")
    assert_as_good_as_reference(dw, rdw, edw, dtype, "dweights")


def test_permute_backward_sums_each_tokens_rows():
    """dx[n] is the sum of the k sorted rows of token n's pairs, exactly (fp32 adds of integers)."""
    groups = group_by_expert_reference(_routing(11, 4, 3, seed=2)[1], 4)
    x = torch.zeros(11, 8, device=DEVICE, requires_grad=True)
    dxs = torch.arange(33 * 8, device=DEVICE, dtype=torch.float32).view(33, 8)
    permute(x, groups).backward(dxs)
    want = torch.zeros(11, 8, device=DEVICE).index_add_(0, groups.rows, dxs)
    assert torch.equal(x.grad, want)
