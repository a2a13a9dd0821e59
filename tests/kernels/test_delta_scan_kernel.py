"""kernels/delta_scan.py: the chunk scan (the Triton kernels, in the interpreter on a CPU, and the torch loop, both
with their written-out backward) against autograd through the torch loop: values and gradients of every input (the
initial state included), the state resets of packed runs, and which form runs for which shapes."""
import pytest
import torch

from fasttune.kernels.delta_scan import ScanConfig, chunk_scan, chunk_scan_reference, scan_config
from kernel_check import dtypes_for_device

DEVICE, _ = dtypes_for_device()
FORMS = {"torch": "torch", "triton": "", "triton-split": "16,4,1,ieee", "triton-tf32": "32,4,2,tf32"}  # the env


def _inputs(b, h, n, c, dk, dv, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w, k = (torch.randn(b, h, n, c, dk, device=DEVICE, generator=g) * 0.2 for _ in range(2))
    u = torch.randn(b, h, n, c, dv, device=DEVICE, generator=g)
    gamma = torch.rand(b, h, n, device=DEVICE, generator=g)
    s0 = torch.randn(b, h, dk, dv, device=DEVICE, generator=g)
    return [x.requires_grad_() for x in (w, u, k, gamma, s0)]


def _check(inputs, keep, tolerance, with_w=True):
    """Without w (Mamba-2's scan) the kernel returns no v (it is u): states and final state are compared, and the
    gradients of the other inputs."""
    if not with_w:
        inputs[0] = None
    twins = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    got, want = chunk_scan(*inputs, keep=keep), chunk_scan_reference(*twins, keep=keep)
    if not with_w:
        assert got[1] is None
        got, want = (got[0], got[2]), (want[0], want[2])
    grads = [torch.randn_like(x) for x in want]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, grads)
    outputs = ["states", "v", "final"] if with_w else ["states", "final"]
    for name, a, e in [*zip(outputs, got, want),
                       *((n, x.grad, y.grad) for n, x, y in zip(["dw", "du", "dk", "dgamma", "ds0"], inputs, twins)
                         if x is not None)]:
        err = ((a - e).norm() / e.norm()).item()
        assert err < tolerance, (name, err)
    return got


def _use(form, monkeypatch):
    """FASTTUNE_DELTA_SCAN for the form; the Triton ones (in the interpreter on a CPU) under FASTTUNE_KERNELS=triton.
    Returns the tolerance: fp32 products in another order (~1e-7), or TF32 products on a GPU (~5e-3 after 5 chunks)."""
    monkeypatch.setenv("FASTTUNE_DELTA_SCAN", FORMS[form])
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    config = scan_config(torch.empty(1, 16, 16, device=DEVICE), torch.empty(1, 16, 16, device=DEVICE))
    assert (config is None) == (form == "torch")
    return 1e-5 if config is None or config.precision == "ieee" else 2e-2


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("c,dk,dv", [(16, 16, 32), (64, 32, 16), (16, 16, 48)])
def test_scan_equals_the_torch_loop(form, c, dk, dv, monkeypatch):
    """d_v 48: not a power of two: one block of 64 masked past column 48 (by default), three of 16, or 32 + 16 masked
    (Nemotron-H's Mamba heads of 80 run as 64 + 64 masked)."""
    _check(_inputs(2, 3, 5, c, dk, dv), None, _use(form, monkeypatch))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_scan_without_correction_term(form, monkeypatch):
    """w None (Mamba-2's scan between chunks, models/ssd.py): the loop with V_i = U_i, packed resets included."""
    keep = torch.tensor([[1.0, 1, 0, 1, 1], [1.0, 0, 1, 1, 0]], device=DEVICE)
    _check(_inputs(2, 3, 5, 16, 16, 48, seed=2), keep, _use(form, monkeypatch), with_w=False)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_keep_zeroes_the_state_where_a_run_starts(form, monkeypatch):
    """keep (B, n): values and gradients equal autograd through the loop with the resets."""
    keep = torch.tensor([[1.0, 1, 0, 1, 0, 1], [0.0, 1, 1, 1, 1, 0]], device=DEVICE)
    got = _check(_inputs(2, 2, 6, 16, 16, 32, seed=1), keep, _use(form, monkeypatch))
    assert (got[0][0, :, 2] == 0).all()  # row 0's third chunk starts from zero


def test_which_form_runs(monkeypatch):
    """The Triton scan only for power-of-two C and d_k of at least 16 (tl.dot) and d_v a multiple of 16, never under
    FASTTUNE_DELTA_SCAN=torch;
    FASTTUNE_DELTA_SCAN="bv,warps,stages,precision" sets the tiles, bv capped at d_v; TF32 only on CUDA."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    w = lambda c, dk: torch.empty(1, 1, 1, c, dk, device=DEVICE)  # noqa: E731
    u = lambda c, dv: torch.empty(1, 1, 1, c, dv, device=DEVICE)  # noqa: E731
    cuda = DEVICE == "cuda"
    assert scan_config(w(64, 128), u(64, 128)) == ScanConfig(64, 4, 2, "ieee")  # fp32 inputs: IEEE products
    assert scan_config(w(64, 128), u(64, 128), tf32=True) == ScanConfig(64, 4, 2, "tf32" if cuda else "ieee")
    assert scan_config(w(64, 128), u(64, 32)).bv == 32
    assert scan_config(w(64, 128), u(64, 80)).bv == 64  # two blocks of 64, the second masked past column 80
    assert scan_config(w(64, 128), u(64, 48)).bv == 64
    for c, dk, dv in [(64, 24, 128), (48, 128, 128), (64, 128, 8), (64, 128, 24)]:
        assert scan_config(w(c, dk), u(c, dv)) is None
    monkeypatch.setenv("FASTTUNE_DELTA_SCAN", "64,8,3,tf32")
    assert scan_config(w(64, 128), u(64, 32)) == ScanConfig(32, 8, 3, "tf32" if cuda else "ieee")
    monkeypatch.setenv("FASTTUNE_DELTA_SCAN", "torch")
    assert scan_config(w(64, 128), u(64, 128)) is None
    monkeypatch.setenv("FASTTUNE_DELTA_SCAN", "")
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    assert scan_config(w(64, 128), u(64, 128)) is None


@pytest.mark.parametrize("bad", ["fast", "48,4,2", "64,4", "64,4,2,bf16", "64,0,2"])
def test_malformed_setting_is_a_config_error(bad, monkeypatch):
    from fasttune.errors import ConfigError

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    monkeypatch.setenv("FASTTUNE_DELTA_SCAN", bad)
    with pytest.raises(ConfigError, match="FASTTUNE_DELTA_SCAN=.*'bv,warps,stages"):
        scan_config(torch.empty(1, 1, 1, 64, 128, device=DEVICE), torch.empty(1, 1, 1, 64, 128, device=DEVICE))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_keys_shared_by_groups_of_heads(form, monkeypatch):
    """k per group of 3 heads (Mamba-2's B): the states come with each group's heads side by side (d_v 48 each), equal
    to the loop with every head's own copy of the keys; the key gradient is the sum of the group's heads'; w refused."""
    from fasttune.kernels.delta_scan import _per_head

    tolerance = _use(form, monkeypatch)
    _, u, k, gamma, s0 = _inputs(2, 6, 4, 16, 16, 48, seed=3)
    k = k[:, ::3].detach().clone().requires_grad_()  # 2 groups of 3 heads
    keep = torch.tensor([[1.0, 0, 1, 1], [1.0, 1, 1, 0]], device=DEVICE)
    twins = [x.detach().clone().requires_grad_() for x in (u, k, gamma, s0)]
    states, v, final = chunk_scan(None, u, k, gamma, s0, keep=keep)
    assert v is None and states.shape == (2, 2, 4, 16, 3 * 48)
    per_head = twins[1].repeat_interleave(3, dim=1)
    want_states, _, want_final = chunk_scan_reference(None, twins[0], per_head, *twins[2:], keep=keep)
    grads = [torch.randn_like(want_states), torch.randn_like(want_final)]
    from fasttune.kernels.delta_scan import _grouped

    torch.autograd.backward([states, final], [_grouped(grads[0], 3), grads[1]])
    torch.autograd.backward([want_states, want_final], grads)
    for name, a, e in [("states", _per_head(states, 3), want_states), ("final", final, want_final),
                       *((n, x.grad, y.grad) for n, x, y in zip(["du", "dk", "dgamma", "ds0"], (u, k, gamma, s0),
                                                                 twins))]:
        err = ((a - e).norm() / e.norm()).item()
        assert err < tolerance, (name, err)
    with pytest.raises(ValueError, match="w only with a key per head"):
        chunk_scan(torch.zeros_like(u[..., :16]), u, k, gamma, s0)
