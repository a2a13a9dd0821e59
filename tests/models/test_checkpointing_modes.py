"""Every gradient-checkpointing mode gives the gradients of no checkpointing (fp32, tiny model), with LoRA dropout
(the recompute must draw the same masks) and with padding."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel


def _grads(model, mode, ids, mask):
    model.gradient_checkpointing = mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks for every mode
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("mode", [True, "offload"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])  # triton: the fused LoRA function draws the masks
def test_mode_equals_no_checkpointing(tiny_model_dir, family, mode, kernels, monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1, modules_to_save=["lm_head"])
    model.train()
    randomize_lora_b(model)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    loss, ref = _grads(model, False, ids, mask)
    loss2, got = _grads(model, mode, ids, mask)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys() and all(g is not None for g in got.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
