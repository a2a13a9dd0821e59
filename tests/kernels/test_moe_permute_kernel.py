"""MoE permute/unpermute (kernels/moe_permute.py): the Triton gathers and their backward passes against the torch
references and fp64, with empty experts, H not a multiple of the column block, and k = 1."""
import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.moe_permute import gather_sum_reference, inverse_order, permute, unpermute  # noqa: E402
from fasttune.models.moe import route, sort_by_expert  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


def _routing(n, e, k, seed=0):
    torch.manual_seed(seed)
    weights, experts = route(torch.randn(n, e, device=DEVICE), k, norm_topk_prob=True)
    experts = experts.masked_fill(experts == 1, 0) if k == 1 else experts  # k=1: expert 1 left empty
    order, _, _ = sort_by_expert(experts, e)
    return weights, experts, order


def test_inverse_order_places_every_pair():
    weights, experts, order = _routing(23, 6, 3)
    pos = inverse_order(order, 3)
    flat = experts.reshape(-1)
    assert torch.equal(flat[order][pos.reshape(-1)], flat)  # sorted row pos[n, j] is pair (n, j)
    assert torch.equal(torch.sort(pos.reshape(-1)).values, torch.arange(69, device=DEVICE))


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
    weights, _, order = _routing(n, e, k)
    pos = inverse_order(order, k)
    x = torch.randn(n, h, device=DEVICE).to(dtype)
    scale = torch.randn(n * k, 1, device=DEVICE).to(dtype)  # stands in for the experts: each row its own factor
    grad = torch.randn(n, h, device=DEVICE).to(dtype)

    def ref(x, w):  # plain autograd: x[order // k], then the weighted sum of each token's rows
        rows = x[order // k] * scale.to(x.dtype)
        return gather_sum_reference(rows, pos, w.to(x.dtype) if x.dtype == torch.float64 else w)

    def ours(x, w):
        return unpermute(permute(x, order, pos) * scale.to(x.dtype), pos, w)

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
    _, _, order = _routing(11, 4, 3, seed=2)
    pos = inverse_order(order, 3)
    x = torch.zeros(11, 8, device=DEVICE, requires_grad=True)
    dxs = torch.arange(33 * 8, device=DEVICE, dtype=torch.float32).view(33, 8)
    permute(x, order, pos).backward(dxs)
    want = torch.zeros(11, 8, device=DEVICE).index_add_(0, order // 3, dxs)
    assert torch.equal(x.grad, want)
