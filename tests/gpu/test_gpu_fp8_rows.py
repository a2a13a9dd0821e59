"""GPU checks of load_in_fp8 (skipped without CUDA or below compute capability 8.9): the row quantiser in bf16
equals its torch reference bit for bit; torch._scaled_mm's products equal the fp32 products of the same FP8 values
to bf16 rounding; a bf16 FP8 LoRA model's logits and gradients are those of the CPU's fp32 computation of the same
recipe, and it trains like the bf16 model."""
import pytest
import torch
from peft_oracle import randomize_lora_b
from tiny import lora_losses

from fasttune import FastLanguageModel
from fasttune.kernels.fp8 import (FEW_ROWS, fp8_gemm_runs, fp8_input_grad, fp8_linear, quantize_rows,
                                  quantize_rows_reference, scaled_mm_reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 on CUDA")]


@pytest.mark.parametrize("shape", [(7, 64), (300, 4096), (4096, 14336)])
@pytest.mark.parametrize("col", [False, True])
def test_bf16_row_quantiser_equals_reference(shape, col):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 3).bfloat16()
    c = torch.rand(shape[1], device="cuda") + 0.5 if col else None
    q, s = quantize_rows(x, c)
    q_ref, s_ref = quantize_rows_reference(x, c)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("m, k, n", [(300, 256, 512), (4096, 4096, 1024)])
def test_scaled_mm_products_equal_the_fp32_products_of_the_same_values(m, k, n):
    assert fp8_gemm_runs(torch.empty(0, device="cuda"), k, n)
    torch.manual_seed(1)
    x = torch.randn(m, k, device="cuda").bfloat16()
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    g = torch.randn(m, n, device="cuda").bfloat16()
    wq, ws = quantize_rows_reference(w)
    ws = ws.view(-1)
    xq, xs = quantize_rows(x)
    y = fp8_linear(xq, xs, wq, ws, torch.bfloat16)
    want = scaled_mm_reference(xq, xs, wq.t(), ws.view(1, -1), torch.float32)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - want).abs() <= 2 ** -7 * want.abs() + 1e-3 * want.abs().max()).all()
    dx = fp8_input_grad(g, wq, ws)
    gq, gs = quantize_rows_reference(g, ws)
    want = scaled_mm_reference(gq, gs, wq, torch.ones(1, k, device="cuda"), torch.float32)
    assert ((dx.float() - want).abs() <= 2 ** -7 * want.abs() + 1e-3 * want.abs().max()).all()


@pytest.mark.parametrize("m", [1, 2, 16, 33, 64, 100, FEW_ROWS])
@pytest.mark.parametrize("n, k", [(1024, 4096), (4096, 14336), (14336, 4096), (70, 300)])
def test_few_rows_kernel_equals_the_fp32_products_on_the_card(m, n, k):
    """Decode-sized products: the exact products' sums to bf16's rounding plus an accumulation error below 2^-12
    of the sum of |products| (the FP8 MMA's partial sums hold ~13 bits until they join the fp32 accumulator every
    128 products; without that promotion the test fails at K = 14,336)."""
    torch.manual_seed(2)
    xq, xs = quantize_rows(torch.randn(m, k, device="cuda").bfloat16())
    wq, ws = quantize_rows_reference((torch.randn(n, k, device="cuda") * 0.02).bfloat16())
    y = fp8_linear(xq, xs, wq, ws.view(-1), torch.bfloat16)
    want = scaled_mm_reference(xq, xs, wq.t(), ws.view(1, -1), torch.float32)
    sum_abs = scaled_mm_reference(xq.float().abs().to(xq.dtype), xs, wq.float().abs().to(wq.dtype).t(),
                                  ws.view(1, -1), torch.float32)
    excess = ((y.float() - want).abs() - 2 ** -8 * want.abs()) / sum_abs
    assert excess.max().item() <= 2 ** -12, excess.max().item()


def test_bf16_lora_model_follows_the_cpu_recipe_and_trains(tiny_model_dir, tmp_path):
    """The same adapter over the same FP8 weights: bf16 on the GPU (torch._scaled_mm) against fp32 on the CPU (the
    fp32 products of the same recipe): loss and LoRA gradients agree to bf16 precision; then ten bf16 steps on the
    GPU lower the loss, starting where the bf16 model without FP8 starts."""
    folder = str(tiny_model_dir("llama"))
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    model, _ = FastLanguageModel.from_pretrained(folder, load_in_fp8=True, dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    losses, grads = [], []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_fp8=True, dtype=dtype,
                                                     device=device)
        model.train()
        loss = model(ids.to(device), labels=ids.to(device)).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().cpu().flatten() for p in model.parameters() if p.requires_grad]))
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0]
    assert (grads[1] - grads[0]).norm() < 0.05 * grads[0].norm()
    curves = []
    for fp8 in (False, True):
        model, _ = FastLanguageModel.from_pretrained(folder, load_in_fp8=fp8, dtype=torch.bfloat16, device="cuda")
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
        curves.append(lora_losses(model, ids.cuda(), steps=10, lr=5e-3))
    assert abs(curves[1][0] - curves[0][0]) < 0.01 * curves[0][0]
    assert curves[1][-1] < curves[1][0] - 0.5, curves
