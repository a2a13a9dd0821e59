"""GPU checks of MoE experts (skipped without CUDA): NF4 stacked experts through torch's bf16 grouped GEMM equal the
dequantised stack, forward and backward, and a load_in_4bit MoE model trains LoRA on attention and experts."""
import pytest
import torch
from tiny import lora_losses

from fasttune import FastLanguageModel
from fasttune.models.moe import experts_forward
from fasttune.quant.experts import QuantExpertWeight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_nf4_experts_grouped_mm_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(8, 256, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    down = torch.randn(8, 128, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    q_gate_up, q_down = QuantExpertWeight.quantize(gate_up), QuantExpertWeight.quantize(down)
    x = torch.randn(64, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(64, 2, device="cuda", generator=g)
    experts = torch.randint(0, 8, (64, 2), device="cuda", generator=g)
    out = experts_forward(x, weights, experts, q_gate_up, q_down, "silu", method="grouped_mm")
    x2 = x.detach().clone().requires_grad_(True)
    ref = experts_forward(x2, weights, experts, q_gate_up.dequantized(), q_down.dequantized(), "silu",
                          method="grouped_mm")
    torch.testing.assert_close(out, ref)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_load_in_4bit_moe_lora_steps(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), load_in_4bit=True,
                                                 dtype=torch.bfloat16, device="cuda")
    assert any(isinstance(m, QuantExpertWeight) for m in model.modules())
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules="all-linear")
    losses = lora_losses(model, torch.randint(3, 300, (2, 32), device="cuda"), 5)
    assert losses[-1] < losses[0]
