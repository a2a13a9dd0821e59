"""kernels/fp8.py: the row quantiser (Triton) against its torch reference, and the FP8 products against their
definition from the same quantised values; the fused LoRA group over an FP8 base against the module path."""
import pytest
import torch
import torch.nn as nn

from fasttune.kernels.fp8 import (FP8, FP8_MAX, fp8_matmul, quantize_rows, quantize_rows_reference,
                                  scaled_mm_reference)
from fasttune.kernels.lora import lora_group
from fasttune.peft.lora import LoraLinear
from fasttune.quant.linear import QuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8).float()
E4M3_VALUES = E4M3_VALUES[E4M3_VALUES.isfinite()].unique()


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_reference_rounds_to_nearest_e4m3_with_the_row_maximum_at_448():
    torch.manual_seed(0)
    x = torch.randn(6, 200) * torch.logspace(-3, 3, 6).unsqueeze(1)
    x[4] = 0
    q, s = quantize_rows_reference(x)
    assert q.dtype == FP8 and s.shape == (6, 1) and s.dtype == torch.float32
    v = x / s
    nearest = E4M3_VALUES[(v.unsqueeze(-1) - E4M3_VALUES).abs().argmin(-1)]
    assert torch.equal(q.float()[:4], nearest[:4]) and (q.float()[4] == 0).all()  # no tie in random data
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 2, 3, 5]], torch.full((5,), FP8_MAX))
    rows = [0, 1, 2, 3, 5]
    err = (q.float() * s - x).abs()[rows] / s[rows]
    assert err.amax() <= 16  # at most half a step of e4m3's top binade (256-448, steps of 32), in units of s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("col", [False, True])
def test_kernel_equals_reference_bit_for_bit(dtype, col, triton_kernels):
    """Every e4m3 value, every midpoint (ties to even), subnormals, an all-zero row, rows longer than a block,
    and a strided row: the same codes and scales as the reference."""
    torch.manual_seed(1)
    x = torch.randn(9, 2500, device=DEVICE) * 3
    grid = torch.cat([E4M3_VALUES, (E4M3_VALUES[1:] + E4M3_VALUES[:-1]) / 2]).to(DEVICE)
    x[0, :grid.numel()] = grid
    x[0, grid.numel():] = 0
    x[1] = 0
    x[2, :4] = torch.tensor([1e-9, 3 * 2 ** -10, -5 * 2 ** -11, 2 ** -7 + 2 ** -11])
    x = x.to(dtype)[:, 100:2400]  # strided rows
    c = (torch.rand(2300, device=DEVICE) + 0.5) if col else None
    q, s = quantize_rows(x, c)
    q_ref, s_ref = quantize_rows_reference(x, c)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_product_and_gradient_follow_their_definition():
    """y = (xq xs)(wq ws)^T; d(x) = quantised (g ws) times wq, both from the codes of quantize_rows; close to the
    16-bit product within FP8's precision. (On the CPU: the GPU's bf16-output products are tests/gpu's.)"""
    torch.manual_seed(2)
    x = torch.randn(3, 7, 64, requires_grad=True)
    w = torch.randn(48, 64) * 0.05
    wq, ws = quantize_rows_reference(w)
    ws = ws.view(-1)
    y = fp8_matmul(x, wq, ws)
    g = torch.randn_like(y)
    y.backward(g)
    xq, xs = quantize_rows_reference(x.detach().reshape(-1, 64))
    torch.testing.assert_close(y.detach().reshape(-1, 48), scaled_mm_reference(xq, xs, wq.t(), ws.view(1, -1),
                                                                               torch.float32), rtol=1e-5, atol=1e-5)
    gq, gs = quantize_rows_reference(g.reshape(-1, 48), ws)
    torch.testing.assert_close(x.grad.reshape(-1, 64), scaled_mm_reference(gq, gs, wq, torch.ones(1, 64),
                                                                           torch.float32), rtol=1e-5, atol=1e-5)
    exact = x.detach() @ w.t()
    assert ((y.detach() - exact).norm() / exact.norm()) < 0.06
    assert ((x.grad - g @ w).norm() / (g @ w).norm()) < 0.06


def _lora_layers(outs, fp8=True):
    torch.manual_seed(3)
    layers = []
    for out in outs:
        base = nn.Linear(64, out, bias=out == 32, device=DEVICE).requires_grad_(False)
        layer = LoraLinear(QuantLinear.from_linear(base, "fp8") if fp8 else base, 4, 2.0, 0.0)
        layer.reset_parameters()
        nn.init.normal_(layer.lora_B, std=0.5)
        layers.append(layer)
    return layers


def test_fused_lora_group_over_fp8_bases_equals_module_path(monkeypatch):
    """The group quantises x once for all its layers and adds each layer's FP8 input gradient: the same outputs,
    d(x) and LoRA gradients as each LoraLinear over its QuantLinear("fp8") under autograd."""
    layers = _lora_layers((48, 32, 32))
    x = torch.randn(2, 5, 64, device=DEVICE)
    grads = [torch.randn(2, 5, o, device=DEVICE) for o in (48, 32, 32)]
    results = []
    for fused in (True, False):
        monkeypatch.setenv("FASTTUNE_KERNELS", "triton" if fused else "torch")
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        outs = lora_group(xi, layers) if fused else [layer(xi) for layer in layers]
        torch.autograd.backward(outs, grads)
        results.append([*outs, xi.grad, *[p.grad for layer in layers for p in (layer.lora_A, layer.lora_B)]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 16, 33, 64, 100])
def test_few_rows_kernel_equals_the_fp32_product(m, triton_kernels):
    """Decode-sized inputs (at most FEW_ROWS rows) take the Triton kernel that reads each weight row once; ragged N
    and K; blocks of 16, 32 and 64 rows (100: two blocks); 16-bit output."""
    from fasttune.kernels.fp8 import FEW_ROWS, fp8_linear

    assert m <= FEW_ROWS
    torch.manual_seed(4)
    xq, xs = quantize_rows_reference(torch.randn(m, 300, device=DEVICE))
    wq, ws = quantize_rows_reference(torch.randn(70, 300, device=DEVICE) * 0.1)
    y = fp8_linear(xq, xs, wq, ws.view(-1), torch.float16)
    want = scaled_mm_reference(xq, xs, wq.t(), ws.view(1, -1), torch.float32)
    # + the FP8 MMA's partial sums on a GPU (exact on the CPU): below 2^-12 of the sum of |products|
    sum_abs = scaled_mm_reference(xq.float().abs().to(FP8), xs, wq.float().abs().to(FP8).t(), ws.view(1, -1),
                                  torch.float32)
    assert y.dtype == torch.float16
    assert ((y.float() - want).abs() <= 2 ** -10 * want.abs() + 2 ** -12 * sum_abs + 1e-6).all()


def test_few_row_products_go_to_the_kernel_only_where_it_was_faster(triton_kernels, monkeypatch):
    """Up to 64 rows for every weight, up to 128 below 8,192 weight rows; the rest to the GEMM path."""
    from fasttune.kernels import fp8

    taken = []
    monkeypatch.setattr(fp8, "_few_rows", lambda xq, *a, **k: taken.append(xq.shape[0]) or torch.zeros(0))
    for m, n in [(64, 8192), (65, 8192), (128, 4096), (129, 4096), (1, 8192)]:
        xq, xs = quantize_rows_reference(torch.randn(m, 32, device=DEVICE))
        wq, ws = quantize_rows_reference(torch.randn(n, 32, device=DEVICE))
        fp8.fp8_linear(xq, xs, wq, ws.view(-1), torch.float16)
    assert taken == [64, 128, 1]


def test_few_rows_kernel_tiles_rows_in_blocks(triton_kernels):
    """More rows than one block holds: programs along both grid axes cover every output once."""
    from fasttune.kernels.fp8 import _few_rows

    torch.manual_seed(5)
    xq, xs = quantize_rows_reference(torch.randn(40, 300, device=DEVICE))
    wq, ws = quantize_rows_reference(torch.randn(70, 300, device=DEVICE) * 0.1)
    y = _few_rows(xq, xs, wq, ws.view(-1), torch.float32, blocks=(16, 32, 128, 2))
    want = scaled_mm_reference(xq, xs, wq.t(), ws.view(1, -1), torch.float32)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
