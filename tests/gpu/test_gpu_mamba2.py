"""The Mamba-2 hybrids on the card (skipped without CUDA): the scan's Triton chunk scan against the fp32 recurrence,
and for Granite 4.0-H (dense and MoE), Nemotron-H (dense and Nemotron 3's MoE), Bamba and Falcon-H1 bf16 LoRA
training with recompute and greedy generation through the CUDA-graph decode equal to the eager one (the conv and
scan states updated in place inside the graph)."""
import pytest
import torch
from tiny import check_bf16_lora_and_graph_decode

from fasttune.models.ssd import ssd_scan, ssd_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_scan_at_granite_sizes_equals_the_recurrence(dtype, tolerance):
    """Granite 4.0-H's head layout (64 heads of 64, one group, state 128) over 300 positions: the chunked scan (the
    Triton chunk scan between chunks, TF32 products for 16-bit inputs) within the input dtype's rounding of the fp32
    recurrence."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h, p, n = 64, 64, 128
    x = torch.randn(1, 300, h, p, device="cuda", generator=g)
    dt = torch.rand(1, 300, h, device="cuda", generator=g) * 0.1 + 0.001
    a = -torch.rand(h, device="cuda", generator=g) - 0.1
    b, c = (torch.randn(1, 300, 1, n, device="cuda", generator=g) / n ** 0.5 for _ in range(2))
    d = torch.randn(h, device="cuda", generator=g)
    y, _ = ssd_scan(x.to(dtype), dt, a, b.to(dtype), c.to(dtype), d)
    state, want = torch.zeros(1, h, p, n, device="cuda"), []
    for i in range(300):
        want.append(ssd_step(x[:, i], dt[:, i], a, b[:, i], c[:, i], d, state))
    want = torch.stack(want, dim=1)
    assert ((y - want).norm() / want.norm()).item() < tolerance


@pytest.mark.parametrize("fused", [False, True], ids=["torch-chunks", "fused-chunks"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_scan_at_nemotron_sizes_values_and_gradients(dtype, tolerance, fused, monkeypatch):
    """Nemotron Nano 2's head layout (heads of 80: the Triton chunk scan in two blocks of 64 columns, the second
    masked; 8 groups of 2 heads here) over 200 positions: outputs and the gradients of x, dt, B and C against autograd
    through the fp32 recurrence (TF32 products for 16-bit inputs), with the torch within-chunk products and with the
    fused kernels (the default; FASTTUNE_SSD=torch takes the torch form, kernels/ssd_chunk.py)."""
    monkeypatch.setenv("FASTTUNE_SSD", "triton" if fused else "torch")
    g = torch.Generator(device="cuda").manual_seed(1)
    h, p, n, groups, t = 16, 80, 128, 8, 200
    x = torch.randn(1, t, h, p, device="cuda", generator=g)
    dt = torch.rand(1, t, h, device="cuda", generator=g) * 0.1 + 0.001
    a = -torch.rand(h, device="cuda", generator=g) - 0.1
    b, c = (torch.randn(1, t, groups, n, device="cuda", generator=g) / n ** 0.5 for _ in range(2))
    d = torch.randn(h, device="cuda", generator=g)
    ours = [(m.to(dtype) if m.dim() == 4 else m).clone().requires_grad_() for m in (x, dt, b, c)]
    y, _ = ssd_scan(ours[0], ours[1], a, ours[2], ours[3], d)
    ref = [m.clone().requires_grad_() for m in (x, dt, b, c)]
    state, want = torch.zeros(1, h, p, n, device="cuda"), []
    for i in range(t):  # y_t = S_t C_t + D x_t, S_t the state after position t
        state = _next_state(state, ref[0][:, i], ref[1][:, i], a, ref[2][:, i])
        cc = ref[3][:, i].repeat_interleave(h // groups, dim=1)
        want.append((state @ cc[..., None])[..., 0] + d[:, None] * ref[0][:, i])
    want = torch.stack(want, dim=1)
    grad = torch.randn_like(want)
    y.backward(grad)
    want.backward(grad)
    assert ((y - want).norm() / want.norm()).item() < tolerance
    for name, mine, exact in zip("x dt B C".split(), ours, ref):
        err = ((mine.grad.float() - exact.grad).norm() / exact.grad.norm()).item()
        assert err < 2 * tolerance, (name, err)


def _next_state(state, x, dt, a, b):
    """The recurrence's state after one position, out of place (autograd): (B, H, P, N)."""
    b = b.repeat_interleave(x.shape[1] // b.shape[1], dim=1)
    return state * (dt * a).exp()[..., None, None] + (dt[..., None] * x)[..., None] * b[:, :, None]


@pytest.mark.parametrize("family", ["granitemoehybrid", "granitemoehybrid_moe", "nemotron_h", "nemotron_h_moe",
                                    "bamba", "falcon_h1"])
def test_bf16_lora_trains_and_generation_graphs_equal_eager(family, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FASTTUNE_SSD", "torch")  # the torch within-chunk form (the fused kernels: the next test)
    check_bf16_lora_and_graph_decode(tiny_model_dir(family), monkeypatch)


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1"])
def test_bf16_lora_with_fused_chunks(family, tiny_model_dir, monkeypatch):
    """The same with the fused within-chunk kernels (the default): training and the prefill take them."""
    monkeypatch.setenv("FASTTUNE_SSD", "triton")
    check_bf16_lora_and_graph_decode(tiny_model_dir(family), monkeypatch)
