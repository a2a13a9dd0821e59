"""NF4 stacked MoE experts (quant/experts.py, models/moe.py's expert_linear): the grouped GEMM on the NF4 stack
equals it on the dequantised stack, forward and backward, without saving the 16-bit stack; `load_in_4bit` MoE
models hold their experts in NF4 (per-expert and stacked checkpoints), train LoRA on attention and experts, and
export merged weights equal to the dequantised base plus the LoRA delta."""
import pytest
import torch
from tiny import hf_model, lora_losses, save_hf

from fasttune import FastLanguageModel
from fasttune.export.merged import merged_state_dict
from fasttune.models.moe import experts_forward
from fasttune.quant.experts import QuantExpertWeight
from fasttune.quant.linear import QuantLinear


def test_nf4_stack_matmul_equals_the_dequantised_stack():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(4, 32, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    q_gate_up, q_down = QuantExpertWeight.quantize(gate_up), QuantExpertWeight.quantize(down)
    assert q_gate_up.shape == gate_up.shape and q_gate_up.packed.numel() == gate_up.numel() // 2  # 4 bits a weight
    x = torch.randn(10, 16, generator=g, requires_grad=True)
    weights = torch.rand(10, 2, generator=g)
    experts = torch.randint(0, 4, (10, 2), generator=g)
    out = experts_forward(x, weights, experts, q_gate_up, q_down, "silu", method="padded_bmm")
    x2 = x.detach().clone().requires_grad_(True)
    ref = experts_forward(x2, weights, experts, q_gate_up.dequantized(torch.float32),
                          q_down.dequantized(torch.float32), "silu", method="padded_bmm")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    # dequantised weights differ from the originals by NF4's rounding only
    assert (q_gate_up.dequantized(torch.float32) - gate_up).abs().max() < 0.3 * gate_up.abs().max()


def test_dequantised_stack_is_not_saved_for_backward():
    q = QuantExpertWeight.quantize(torch.randn(4, 64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        experts_forward(x, torch.rand(8, 1), torch.randint(0, 4, (8, 1)), q, QuantExpertWeight.quantize(
            torch.randn(4, 64, 32)), "silu", method="padded_bmm").sum()
    assert torch.Size([4, 64, 64]) not in saved and torch.Size([4, 64, 32]) not in saved


def test_nf4_stack_with_fused_expert_lora(monkeypatch):
    """Our kernels' fused expert LoRA on an NF4 stack (models/moe.py's expert_linear -> expert_lora_linear) equals
    the same LoRA on the dequantised stack through torch's path, forward and backward, and saves no 16-bit stack."""
    pytest.importorskip("triton")
    from fasttune.models import moe
    from fasttune.peft.lora import ExpertLora

    monkeypatch.setattr(moe, "EAGER_FUSED_MIN_WORK", 0)  # the fused path at a tiny size
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(4, 64, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    q_gate_up, q_down = QuantExpertWeight.quantize(gate_up), QuantExpertWeight.quantize(down)
    adapters = {"gate_up_proj": ExpertLora(gate_up, 4, 0.5), "down_proj": ExpertLora(down, 4, 2.0)}
    for a in adapters.values():
        a.reset_parameters()
        torch.nn.init.normal_(a.lora_B, std=0.1, generator=g)
    x = torch.randn(12, 32, generator=g)
    weights, experts = torch.rand(12, 2, generator=g), torch.randint(0, 4, (12, 2), generator=g)
    results = []
    for kernels, stacks in (("triton", (q_gate_up, q_down)),
                            ("torch", (q_gate_up.dequantized(torch.float32), q_down.dequantized(torch.float32)))):
        monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
        xi, saved = x.clone().requires_grad_(), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = experts_forward(xi, weights, experts, *stacks, "silu", method="padded_bmm",
                                  lora={n: a.factors(torch.float32) for n, a in adapters.items()})
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        results.append([out, *torch.autograd.grad(out.square().sum(), [xi, *params])])
        if kernels == "triton":
            assert torch.Size([4, 64, 32]) not in saved and torch.Size([4, 32, 32]) not in saved
    for got, want, name in zip(*results, ("out", "x", "gate_up A", "gate_up B", "down A", "down B")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_load_in_4bit_moe_trains_and_merges(family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)  # per-expert tensors, as transformers writes them
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32)
    stacks = [m for m in model.modules() if isinstance(m, QuantExpertWeight)]
    assert len(stacks) == 2 * len([m for m in model.modules() if type(m).__name__ == "Experts"]) > 0
    ref, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():  # the 16-bit model holding the NF4 values (attention layers are NF4 QuantLinears)
        for name, m in model.named_modules():
            if isinstance(m, QuantExpertWeight):
                ref.get_parameter(name).copy_(m.dequantized(torch.float32))
            elif isinstance(m, QuantLinear):
                ref.get_parameter(f"{name}.weight").copy_(m.dequantized_weight(torch.float32))
    ids = torch.randint(3, 300, (2, 12))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)

    model = FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
    assert any(n.endswith("experts.lora.gate_up_proj.lora_A") for n, _ in model.named_parameters())
    losses = lora_losses(model, ids, 4)
    assert losses[-1] < losses[0]
    merged = merged_state_dict(model, torch.float32)
    name = next(n for n, m in model.named_modules() if isinstance(m, QuantExpertWeight))
    adapter = model.get_submodule(name.rpartition(".")[0]).lora[name.rpartition(".")[2]]
    want = model.get_submodule(name).dequantized(torch.float32) + adapter.delta_weight()
    key = next(k for k in merged if k.endswith(name.split("model.", 1)[1]))
    torch.testing.assert_close(merged[key], want)
    out = model.save_pretrained_merged(tmp_path / "merged", save_method="merged_16bit")
    back, _ = FastLanguageModel.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_stacked_checkpoint_quantises_on_load(tiny_model_dir, tmp_path):
    """A checkpoint that holds the stacked layout (what our merged export writes) is quantised as well."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), dtype=torch.float32)
    out = model.save_pretrained_merged(tmp_path / "stacked", tok, save_method="merged_16bit")
    q, _ = FastLanguageModel.from_pretrained(str(out), load_in_4bit=True, dtype=torch.float32)
    assert any(isinstance(m, QuantExpertWeight) for m in q.modules())
    with torch.no_grad():
        ids = torch.randint(3, 300, (1, 10))
        assert torch.isfinite(q(ids).logits).all()
