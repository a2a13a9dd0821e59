"""kernels/delta_chunk_triton.py: the fused within-chunk kernels (in the interpreter on a CPU) against the torch form
of kernels/delta_chunk.py and autograd through chunked_rule_reference: outputs, final state and every gradient, with
and without packed-run resets; which form FASTTUNE_DELTA_CHUNK and the shapes choose; chunked_delta_rule on the
kernels against transformers' token-by-token recurrence."""
import pytest
import torch

from fasttune.kernels.delta_chunk import chunked_rule, chunked_rule_reference
from fasttune.kernels.delta_chunk_triton import ChunkConfig, chunk_config
from fasttune.kernels.delta_scan import ScanConfig
from kernel_check import dtypes_for_device

pytest.importorskip("triton")
DEVICE, _ = dtypes_for_device()
SCAN = ScanConfig(16, 4, 1, "ieee")


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels (the interpreter on a CPU: tests/conftest.py turns it on) unless FASTTUNE_DELTA_CHUNK says
    otherwise."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    monkeypatch.delenv("FASTTUNE_DELTA_CHUNK", raising=False)
    return monkeypatch


def _inputs(b, h, n, c, dk, dv, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    q, k = (torch.nn.functional.normalize(make(b, h, n, c, dk), dim=-1) for _ in range(2))
    v = make(b, h, n, c, dv)
    beta = torch.rand(b, h, n, c, device=DEVICE, generator=g)
    decay = -torch.rand(b, h, n, c, device=DEVICE, generator=g) * 0.5
    s0 = make(b, h, dk, dv) * 0.1
    return [x.requires_grad_() for x in (q * dk ** -0.5, k, v, beta, decay, s0)]


def _run(fn, inputs, grads):
    """Outputs and input gradients of fn on fresh leaves of `inputs` for the output gradients `grads` (None: that
    output unused)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    torch.autograd.backward(*zip(*((x, grad) for x, grad in zip(out, grads) if grad is not None)))
    return [x.detach() for x in out] + [x.grad for x in leaves]


@pytest.mark.parametrize("b,h,n,c,dk,dv", [(2, 1, 3, 16, 16, 32), (1, 2, 2, 32, 32, 16), (1, 2, 2, 64, 16, 16)])
@pytest.mark.parametrize("packed", [False, True])
def test_kernels_equal_the_torch_form_and_autograd(b, h, n, c, dk, dv, packed, kernels):
    inputs = _inputs(b, h, n, c, dk, dv)
    keep = torch.tensor([[1.0, 0, 1], [1.0, 1, 0]], device=DEVICE)[:b, :n] if packed else None
    assert chunk_config(inputs[1], inputs[2], SCAN) == ChunkConfig(block=min(dk, dv, 32))
    grads = [torch.randn(b, h, n, c, dv, device=DEVICE), torch.randn(b, h, dk, dv, device=DEVICE)]
    got = _run(lambda *x: chunked_rule(*x, keep, SCAN), inputs, grads)
    kernels.setenv("FASTTUNE_DELTA_CHUNK", "torch")
    torch_form = _run(lambda *x: chunked_rule(*x, keep, SCAN), inputs, grads)
    reference = _run(lambda *x: chunked_rule_reference(*x, keep), inputs, grads)
    for name, a, t, r in zip(["o", "final", "dq", "dk", "dv", "dbeta", "dg", "ds0"], got, torch_form, reference):
        for want in (t, r):
            err = ((a - want).norm() / want.norm()).item()  # fp32 products in another order: ~1e-7
            assert err < 1e-5, (name, err)


def test_which_form_runs(kernels):
    """The kernels with the Triton scan only, for C, d_k, d_v powers of two >= 16 and C <= 64; block capped at
    d_k and d_v; TF32 only on CUDA for 16-bit callers; FASTTUNE_DELTA_CHUNK=torch or FASTTUNE_KERNELS=torch: the
    torch form."""
    t = lambda *s: torch.empty(1, 1, 1, *s, device=DEVICE)  # noqa: E731
    assert chunk_config(t(64, 128), t(64, 128), SCAN) == ChunkConfig(32, 4, 1, "ieee")
    cuda = DEVICE == "cuda"
    assert chunk_config(t(64, 128), t(64, 128), SCAN, tf32=True).precision == ("tf32" if cuda else "ieee")
    assert chunk_config(t(64, 128), t(64, 16), SCAN).block == 16
    assert chunk_config(t(64, 128), t(64, 128), None) is None  # the scan in torch
    for (c, dk), dv in [((128, 128), 128), ((48, 128), 128), ((64, 8), 128), ((64, 128), 24)]:
        assert chunk_config(t(c, dk), t(c, dv), SCAN) is None
    kernels.setenv("FASTTUNE_DELTA_CHUNK", "32,4,2")
    assert chunk_config(t(64, 128), t(64, 128), SCAN) == ChunkConfig(32, 4, 2, "ieee")
    kernels.setenv("FASTTUNE_DELTA_CHUNK", "Triton")
    assert chunk_config(t(64, 128), t(64, 128), SCAN) == ChunkConfig()
    kernels.setenv("FASTTUNE_DELTA_CHUNK", "torch")
    assert chunk_config(t(64, 128), t(64, 128), SCAN) is None
    kernels.delenv("FASTTUNE_DELTA_CHUNK")
    kernels.setenv("FASTTUNE_KERNELS", "torch")
    assert chunk_config(t(64, 128), t(64, 128), SCAN) is None


@pytest.mark.parametrize("bad", ["fast", "64,8", "48,8,1", "64,3,1", "64,8,0", "64,8,1,tf32"])
def test_malformed_setting_is_a_config_error(bad, kernels):
    from fasttune.errors import ConfigError

    kernels.setenv("FASTTUNE_DELTA_CHUNK", bad)
    with pytest.raises(ConfigError, match="FASTTUNE_DELTA_CHUNK=.*'torch'.*'triton'.*'block,warps,stages'"):
        chunk_config(torch.empty(1, 1, 1, 64, 128), torch.empty(1, 1, 1, 64, 128), SCAN)


def test_chunked_delta_rule_on_the_kernels_equals_the_recurrence(kernels):
    """Qwen3.5's layer entry point (64-position chunks, the last one partial, grouped heads) on the kernels: outputs,
    final state and the gradients of q, k, v, g, beta against autograd through transformers' recurrence."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    from fasttune.models.delta_rule import chunked_delta_rule

    g = torch.Generator().manual_seed(1)
    b, t, hk, hv, d = 1, 100, 1, 2, 16
    inputs = [torch.randn(b, t, hk, d, generator=g), torch.randn(b, t, hk, d, generator=g),
              torch.randn(b, t, hv, d, generator=g), -torch.rand(b, t, hv, generator=g),
              torch.rand(b, t, hv, generator=g)]
    inputs = [x.to(DEVICE) for x in inputs]
    assert chunk_config(torch.empty(1, 1, 1, 64, d, device=DEVICE), torch.empty(1, 1, 1, 64, d, device=DEVICE), SCAN)
    grad = torch.randn(b, t, hv, d, device=DEVICE)

    def grouped(q, k, v, decay, beta):
        o, state = torch_recurrent_gated_delta_rule(q.repeat_interleave(2, 2), k.repeat_interleave(2, 2), v, decay,
                                                    beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o, state

    got = _run(lambda *x: chunked_delta_rule(*x, final_state=True), inputs, [grad, None])
    want = _run(grouped, inputs, [grad, None])
    for name, a, e in zip(["o", "final", "dq", "dk", "dv", "dg", "dbeta"], got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)
