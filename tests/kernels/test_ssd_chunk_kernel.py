"""kernels/ssd_chunk.py: the fused within-chunk kernels (Triton's interpreter on a CPU) against the torch reference
and fp64 (outputs and the gradients of x, dt, cum, B, C, the entering states and D), with x, B and C read in place
from wider tensors, widths that are no powers of two and a last chunk cut short; and models/ssd.py's fused path
(FASTTUNE_SSD=triton) against the position-by-position recurrence."""
import pytest
import torch
from kernel_check import assert_as_good_as_reference, dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.ssd_chunk import _SSDChunkFunction, ssd_chunk_reference  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


def _inputs(dtype, t=100, h=4, p=24, g=2, n_state=16, chunk=64, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    n = -(-t // chunk)
    wide = r(1, t, h * p + 2 * g * n_state + 8).to(dtype)  # x | B | C | more, as the conv's output holds them
    x = wide[..., :h * p].view(1, t, h, p)
    B = wide[..., h * p:h * p + g * n_state].view(1, t, g, n_state)
    C = wide[..., h * p + g * n_state:h * p + 2 * g * n_state].view(1, t, g, n_state)
    dt = torch.rand(1, t, h, device=DEVICE, generator=gen) * 0.2 + 0.01
    cum = (-torch.rand(1, h, n, chunk, device=DEVICE, generator=gen) * 0.1).cumsum(-1)
    entering = r(1, g, n, n_state, h // g * p) * 0.3
    D = r(h)
    return [x, dt, cum, B, C, entering, D]


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,n_state", [(24, 16), (16, 8), (80, 16)])  # 80: two blocks of 64 columns
def test_matches_reference(dtype, p, n_state):
    inputs = _inputs(dtype, p=p, n_state=n_state)
    dy = torch.randn(1, 100, 4, p, device=DEVICE)
    ours = _grads(lambda *a: _SSDChunkFunction.apply(*a, "ieee"), inputs, dy)
    ref = _grads(ssd_chunk_reference, inputs, dy)
    ex = _grads(ssd_chunk_reference, [t.double() for t in inputs], dy.double())
    for name, a, b, e in zip(["y", "dx", "ddt", "dcum", "dB", "dC", "dentering", "dD"], ours, ref, ex):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_as_good_as_reference(a, b, e, dtype, name)


def test_fused_scan_equals_the_recurrence(monkeypatch):
    """models/ssd.py with FASTTUNE_SSD=triton: outputs, final state and the six inputs' gradients equal the
    non-fused path's (itself tested against the recurrence in tests/models/test_ssd.py)."""
    from fasttune.models.ssd import ssd_scan

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 150, 4, 16, generator=gen)
    dt = torch.rand(1, 150, 4, generator=gen) * 0.5 + 0.01
    a, d = -torch.rand(4, generator=gen) - 0.1, torch.randn(4, generator=gen)
    bb, cc = torch.randn(1, 150, 2, 16, generator=gen), torch.randn(1, 150, 2, 16, generator=gen)
    s0 = torch.randn(1, 4, 16, 16, generator=gen)

    def run(fused):
        monkeypatch.setenv("FASTTUNE_SSD", "triton" if fused else "torch")
        monkeypatch.setenv("FASTTUNE_KERNELS", "triton" if fused else "torch")
        leaves = [t.clone().requires_grad_() for t in (x, dt, a, bb, cc, d)]
        y, state = ssd_scan(*leaves, initial_state=s0, final_state=True)
        (y.square().sum() + state.sum()).backward()
        return [y.detach(), state.detach()] + [t.grad for t in leaves]

    for name, got, want in zip("y state x dt A B C D".split(), run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item(), msg=name)


def test_fused_packed_runs_equal_the_torch_form(monkeypatch):
    """Packed documents (spans, each from a zero state) through the fused path equal the torch form's packing."""
    from fasttune.models.ssd import ssd_scan

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 90, 4, 16, generator=gen)
    dt = torch.rand(2, 90, 4, generator=gen) * 0.5 + 0.01
    a, d = -torch.rand(4, generator=gen) - 0.1, torch.randn(4, generator=gen)
    bb, cc = torch.randn(2, 90, 2, 16, generator=gen), torch.randn(2, 90, 2, 16, generator=gen)
    spans = [(0, 0, 30), (0, 30, 90), (1, 0, 70)]

    def run(fused):
        monkeypatch.setenv("FASTTUNE_SSD", "triton" if fused else "torch")
        monkeypatch.setenv("FASTTUNE_KERNELS", "triton" if fused else "torch")
        leaves = [t.clone().requires_grad_() for t in (x, dt, a, bb, cc, d)]
        y, _ = ssd_scan(*leaves, spans=spans)
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    for name, got, want in zip("y x dt A B C D".split(), run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item(), msg=name)
