"""The Mamba-2 scan (models/ssd.py) against its recurrence, position by position (ssd_step): outputs, final state and
gradients, across chunk boundaries, with an initial state, grouped B / C and packed runs."""
import pytest
import torch

from fasttune.models.ssd import ssd_scan, ssd_step

H, P, G, N = 4, 8, 2, 5


def _inputs(b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, H, P, generator=g)
    dt = torch.rand(b, t, H, generator=g) * 0.5 + 0.01
    a = -torch.rand(H, generator=g) * 2 - 0.1
    bb, cc = torch.randn(b, t, G, N, generator=g), torch.randn(b, t, G, N, generator=g)
    d = torch.randn(H, generator=g)
    return x, dt, a, bb, cc, d


def _recurrence(x, dt, a, bb, cc, d, state=None):
    """y (B, T, H, P) and the final state, one position at a time."""
    state = torch.zeros(x.shape[0], H, P, N) if state is None else state.clone()
    ys = [ssd_step(x[:, i], dt[:, i], a, bb[:, i], cc[:, i], d, state) for i in range(x.shape[1])]
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("t", [1, 63, 64, 150])
def test_chunked_scan_equals_the_recurrence(t):
    x, dt, a, bb, cc, d = _inputs(2, t)
    y, state = ssd_scan(x, dt, a, bb, cc, d, final_state=True)
    want, want_state = _recurrence(x, dt, a, bb, cc, d)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-4, atol=1e-5)


def test_initial_state_continues_a_sequence():
    x, dt, a, bb, cc, d = _inputs(2, 150, seed=1)
    head, state = ssd_scan(x[:, :100], dt[:, :100], a, bb[:, :100], cc[:, :100], d, final_state=True)
    tail, end = ssd_scan(x[:, 100:], dt[:, 100:], a, bb[:, 100:], cc[:, 100:], d, initial_state=state,
                         final_state=True)
    want, want_state = _recurrence(x, dt, a, bb, cc, d)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(end, want_state, rtol=1e-4, atol=1e-5)


def _functional_recurrence(x, dt, a, bb, cc, d):
    """The recurrence without in-place state updates (for autograd): S <- exp(dt A) S + dt x B^T, y = S C + D x."""
    bb, cc = (m.repeat_interleave(H // G, dim=2) for m in (bb, cc))
    s, ys = torch.zeros(x.shape[0], H, P, N), []
    for i in range(x.shape[1]):
        s = s * (dt[:, i] * a).exp()[..., None, None] + (dt[:, i, :, None] * x[:, i])[..., None] * bb[:, i, :, None]
        ys.append((s @ cc[:, i, :, :, None])[..., 0] + d[:, None] * x[:, i])
    return torch.stack(ys, dim=1)


def test_gradients_equal_the_recurrences():
    inputs = [t.requires_grad_() for t in _inputs(1, 90, seed=2)]
    weights = torch.randn(1, 90, H, P, generator=torch.Generator().manual_seed(9))
    (ssd_scan(*inputs)[0] * weights).sum().backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    (_functional_recurrence(*inputs) * weights).sum().backward()
    for name, g, t in zip("x dt A B C D".split(), got, inputs):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_packed_runs_each_start_from_a_zero_state():
    x, dt, a, bb, cc, d = _inputs(2, 150, seed=3)
    spans = [(0, 0, 70), (0, 70, 150), (1, 0, 5), (1, 5, 150)]
    y, state = ssd_scan(x, dt, a, bb, cc, d, spans=spans)
    assert state is None
    for row, start, end in spans:
        part = slice(start, end)
        want, _ = _recurrence(x[row:row + 1, part], dt[row:row + 1, part], a, bb[row:row + 1, part],
                              cc[row:row + 1, part], d)
        torch.testing.assert_close(y[row:row + 1, part], want, rtol=1e-4, atol=1e-5)


def test_triton_chunk_scan_equals_the_recurrence(monkeypatch):
    """With state and head sizes the Triton chunk scan takes (powers of two >= 16), the scan between chunks runs
    kernels/delta_scan.py's kernels (the interpreter on a CPU): outputs and gradients still the recurrence's."""
    pytest.importorskip("triton")
    from fasttune.kernels.delta_scan import scan_config

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 100, 2, 16, generator=g)
    dt = torch.rand(1, 100, 2, generator=g) * 0.5 + 0.01
    a, d = -torch.rand(2, generator=g) - 0.1, torch.randn(2, generator=g)
    bb, cc = torch.randn(1, 100, 1, 16, generator=g), torch.randn(1, 100, 1, 16, generator=g)
    assert scan_config(torch.zeros(1, 1, 1, 64, 16), x) is not None
    inputs = [t.requires_grad_() for t in (x, dt, a, bb, cc, d)]
    y, _ = ssd_scan(*inputs)
    y.square().sum().backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    group = 2  # (heads per group, for the functional recurrence below)
    bh, ch = (m.repeat_interleave(group, dim=2) for m in (bb, cc))
    s, ys = torch.zeros(1, 2, 16, 16), []
    for i in range(100):
        s = s * (dt[:, i] * a).exp()[..., None, None] + (dt[:, i, :, None] * x[:, i])[..., None] * bh[:, i, :, None]
        ys.append((s @ ch[:, i, :, :, None])[..., 0] + d[:, None] * x[:, i])
    want = torch.stack(ys, dim=1)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    want.square().sum().backward()
    for name, mine, t in zip("x dt A B C D".split(), got, inputs):
        torch.testing.assert_close(mine, t.grad, rtol=1e-4, atol=1e-3, msg=name)
