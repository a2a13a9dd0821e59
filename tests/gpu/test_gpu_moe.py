"""GPU checks of MoE experts (skipped without CUDA): NF4 stacked experts through torch's bf16 grouped GEMM equal the
dequantised stack, forward and backward, and a load_in_4bit MoE model trains LoRA on attention and experts."""
import pytest
import torch
from tiny import lora_losses

from fasttune import FastLanguageModel
from fasttune.models.moe import experts_forward, route
from fasttune.peft.lora import ExpertLora
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


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_expert_lora_grads_bf16_grouped_equal_fp32(monkeypatch, kernels):
    """bf16 through the grouped GEMMs (our fused expert LoRA, or torch's path) against fp32 on torch's padded-bmm
    path: output, x and the four LoRA gradients to bf16 accuracy (relative norms)."""
    torch.manual_seed(0)
    n, h, i, e, k, r = 96, 128, 64, 8, 2, 8
    x = torch.randn(n, h, device="cuda")
    gate_up, down = torch.randn(e, 2 * i, h, device="cuda") * 0.1, torch.randn(e, h, i, device="cuda") * 0.1
    weights, experts = route(torch.randn(n, e, device="cuda"), k, norm_topk_prob=True)
    experts = experts.masked_fill(experts == 3, 4)  # an empty group
    adapters = {"gate_up_proj": ExpertLora(gate_up, 2 * r, 0.5), "down_proj": ExpertLora(down, r, 2.0)}
    for a in adapters.values():
        a.reset_parameters()
        torch.nn.init.normal_(a.lora_B, std=0.1)
    grad = torch.randn(n, h, device="cuda")
    results = []
    for dtype, method in ((torch.bfloat16, "grouped_mm"), (torch.float32, "padded_bmm")):
        monkeypatch.setenv("FASTTUNE_KERNELS", kernels if dtype == torch.bfloat16 else "torch")
        xi = x.to(dtype).requires_grad_()
        out = experts_forward(xi, weights, experts, gate_up.to(dtype), down.to(dtype), "silu", method=method,
                              lora={name: a.factors(dtype) for name, a in adapters.items()})
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        grads = torch.autograd.grad(out, [xi, *params], grad.to(dtype))
        results.append([out.float(), *(g.float() for g in grads)])
    for got, want, name in zip(*results, ("out", "x", "gate_up A", "gate_up B", "down A", "down B")):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 2e-2 * want.norm(), name


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "gemma4_moe"])
def test_load_in_4bit_moe_lora_steps(tiny_model_dir, family):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), load_in_4bit=True,
                                                 dtype=torch.bfloat16, device="cuda")
    assert any(isinstance(m, QuantExpertWeight) for m in model.modules())
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules="all-linear")
    losses = lora_losses(model, torch.randint(3, 300, (2, 32), device="cuda"), 5)
    assert losses[-1] < losses[0]
