"""GPU checks of gpt-oss (skipped without CUDA): attention sinks through SDPA's CUDA kernels in bf16 (the
lower-right causal bias, a sliding-window mask with repeated heads, a decode step's additive mask) against the
eager formulation in fp32, forward and backward; the tiny model in bf16 near transformers' fp32 logits, and
LoRA on attention and experts training (loss falls)."""
import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.models.attention import attention_with_sinks, attention_with_sinks_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mask_kind", ["causal", "window", "decode"])
def test_sinks_attention_bf16_cuda(mask_kind):
    g = torch.Generator(device="cuda").manual_seed(0)
    t, s = (1, 300) if mask_kind == "decode" else (300, 300)
    q = torch.randn(2, 8, t, 64, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, s, 64, device="cuda", generator=g) for _ in range(2))
    sinks = torch.randn(8, device="cuda", generator=g)
    mask = bool_mask = None
    if mask_kind == "window":
        pos = torch.arange(s, device="cuda")
        bool_mask = ((pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] < 128))[None, None].expand(2, 1, t, s)
        mask = bool_mask
    elif mask_kind == "decode":
        bool_mask = torch.ones(2, 1, 1, s, dtype=torch.bool, device="cuda")
        bool_mask[0, ..., :5] = False
        mask = torch.zeros(bool_mask.shape, dtype=torch.bfloat16, device="cuda").masked_fill(~bool_mask, float("-inf"))
    leaves = [x.bfloat16().requires_grad_() for x in (q, k, v, sinks)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out = attention_with_sinks(*leaves[:3], mask, 0.125, leaves[3])
    ref = attention_with_sinks_reference(*ref_leaves[:3], bool_mask, 0.125, ref_leaves[3])
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn(ref.shape, device="cuda", generator=g)
    out.backward(grad.bfloat16())
    ref.backward(grad)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-2 * b.grad.abs().max().item())


def test_tiny_gpt_oss_bf16_logits_and_lora_steps(tiny_model_dir):
    from tiny import hf_model, lora_losses

    folder = tiny_model_dir("gpt_oss")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, 300, (2, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits.float().cpu()
        want = hf_model("gpt_oss")(input_ids=ids.cpu()).logits
    # bf16 rounding, and now and then a routing decision that flips: near on average, not everywhere
    assert (ours - want).abs().mean() < 0.05 * want.abs().mean()
    model = FastLanguageModel.get_peft_model(model, r=8)
    losses = lora_losses(model, ids, 5)
    assert losses[-1] < losses[0]
