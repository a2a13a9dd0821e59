import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.rope import (  # noqa: E402
    _RopeFunction, apply_rope_qk, apply_rope_reference, rope_cos_sin, rope_inv_freq)

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, hq, hk, d, rot", [(2, 5, 4, 2, 16, 16), (1, 7, 5, 1, 24, 12), (3, 2, 3, 3, 8, 8),
                                                 (2, 3, 1, 1, 8, 8)])
def test_rope_qk_one_launch_matches_reference(dtype, b, t, hq, hk, d, rot):
    """q and k rotated by one launch (GQA head counts; partial rotary: 12 of 24 dims) equal two reference
    rotations, gradients too."""
    torch.manual_seed(4)
    pos = torch.randint(0, 500, (b, t), device=DEVICE)  # packed-style, non-monotonic positions
    cos, sin = rope_cos_sin(rope_inv_freq(rot, 10000.0).to(DEVICE), pos, torch.float64)
    q, dq = (torch.randn(b, t, hq, d, device=DEVICE).to(dtype) for _ in range(2))
    k, dk = (torch.randn(b, t, hk, d, device=DEVICE).to(dtype) for _ in range(2))
    c, s = cos.to(dtype), sin.to(dtype)

    def grads(fn, tensors, ups):
        leaves = [x.detach().clone().requires_grad_() for x in tensors]
        outs = fn(*leaves)
        torch.autograd.backward(outs, ups)
        return [o.detach() for o in outs] + [x.grad for x in leaves]

    ours = grads(lambda a, e: _RopeFunction.apply(a, e, c, s), [q, k], [dq, dk])
    ref = grads(lambda a, e: (apply_rope_reference(a, c, s), apply_rope_reference(e, c, s)), [q, k], [dq, dk])
    ex = grads(lambda a, e: (apply_rope_reference(a, cos, sin), apply_rope_reference(e, cos, sin)),
               [q.double(), k.double()], [dq.double(), dk.double()])
    for name, a, r, e in zip(("q", "k", "dq", "dk"), ours, ref, ex):
        assert_as_good_as_reference(a, r, e, dtype, name)


def test_rope_qk_dispatch(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    pos = torch.arange(3, device=DEVICE)[None]
    cos, sin = rope_cos_sin(rope_inv_freq(8, 10000.0).to(DEVICE), pos, torch.float32)
    q, k = torch.randn(1, 3, 2, 8, device=DEVICE), torch.randn(1, 3, 1, 8, device=DEVICE)
    a, b = apply_rope_qk(q.requires_grad_(), k, cos, sin)
    assert "Rope" in type(a.grad_fn).__name__
    torch.testing.assert_close(b, apply_rope_reference(k, cos, sin))
