"""models/tiled_mlp.py: the tiled MLP gives the one-shot MLP's logits and LoRA gradients, and its recompute skips what is unused."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.models import mlp as decoder  # (the MLP and its tile size live in models/mlp.py)


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
    monkeypatch.setattr(decoder.MLP, "_mlp", lambda self, x, *a, **k: calls.append(x.shape[1]) or orig(self, x, *a, **k))
    tiled_loss, tiled_grads = _loss_and_grads(model, ids)
    assert max(calls) == 5  # it did tile
    # 8 tiles a layer in the forward pass and 8 in backward's recompute; a layer recompute (checkpointing) skips the
    # MLP, whose value it discards (torch's checkpoint per tile ran it a third time)
    assert len(calls) == model.arch.num_layers * 16
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == tiled_grads.keys()
    for n in grads:
        torch.testing.assert_close(tiled_grads[n], grads[n], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 1 << 30)
        full = model(ids).logits
        monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 2 * 128 * 2 * 5)
        torch.testing.assert_close(model(ids).logits, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", [True, "offload"])
def test_tiled_mlp_recompute_skips_what_is_unused(tiny_model_dir, monkeypatch, mode):
    """With layer recompute, the tiled MLP draws the forward pass's LoRA dropout masks in backward (gradients
    bit-equal to the same tiles without recompute), and base weights are read only where a value is needed: per
    layer and tile, gate/up/down in the forward pass, gate/up in backward's tile recompute (down_proj's output is
    unused), and all three for d(input); the layer recompute itself reads only the attention projections."""
    import fasttune.kernels.lora as lora_mod

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 2 * 128 * 2 * 5)  # 5 positions per tile -> 4 tiles of 19
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1)
    model.train()
    randomize_lora_b(model)
    ids = torch.randint(3, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    grads = {}
    for gc in (False, mode):
        model.gradient_checkpointing = gc
        reads, real = [], lora_mod._base_weight
        monkeypatch.setattr(lora_mod, "_base_weight", lambda layer, dtype: reads.append(1) or real(layer, dtype))
        torch.manual_seed(5)
        grads[gc] = _loss_and_grads(model, ids)[1]
        monkeypatch.setattr(lora_mod, "_base_weight", real)
        tiles, layers = 4, model.arch.num_layers
        mlp = 3 * tiles + 2 * tiles + 3 * tiles  # forward, tile recompute, d(input)
        attention = 4 + (4 if gc is True else 0) + 4  # forward, layer recompute ("offload" keeps the block), backward
        # less q/k/v's d(input) in the first layer, whose input (a frozen embedding's rows) needs no gradient
        assert len(reads) == layers * (mlp + attention) - 3, gc
    for n in grads[False]:
        assert torch.equal(grads[mode][n], grads[False][n]), n
