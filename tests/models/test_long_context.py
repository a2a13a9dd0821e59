"""Long-sequence paths: the tiled MLP gives the same logits and LoRA gradients as the one-shot MLP."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.models import decoder


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_equals_untiled(tiny_model_dir, monkeypatch, checkpointing):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=checkpointing)
    randomize_lora_b(model)
    ids = torch.randint(3, 300, (2, 37), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    calls = []
    monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 2 * 128 * 2 * 5)  # 5 positions per tile -> 8 tiles
    orig = decoder.MLP._mlp
    monkeypatch.setattr(decoder.MLP, "_mlp", lambda self, x, *rest: calls.append(x.shape[1]) or orig(self, x, *rest))
    tiled_loss, tiled_grads = _loss_and_grads(model, ids)
    assert max(calls) == 5  # it did tile
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == tiled_grads.keys()
    for n in grads:
        torch.testing.assert_close(tiled_grads[n], grads[n], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 1 << 30)
        full = model(ids).logits
        monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 2 * 128 * 2 * 5)
        torch.testing.assert_close(model(ids).logits, full, rtol=1e-6, atol=1e-6)
