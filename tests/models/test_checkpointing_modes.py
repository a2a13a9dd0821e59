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


# triton: the fused LoRA function draws the masks. It runs Triton's CPU interpreter (~10 s a case), so only on
# llama; gemma2's sandwich norms are the same recompute logic with more norms.
@pytest.mark.parametrize("family,kernels", [("llama", "torch"), ("gemma2", "torch"), ("llama", "triton"),
                                             ("qwen3_5_text", "torch")])
@pytest.mark.parametrize("mode", [True, "offload"])
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


@pytest.fixture
def keepers(instances_of):
    """The AttentionKeepers made during a test (each forward pass with "offload" makes one)."""
    from fasttune.models.kept_attention import AttentionKeeper

    return instances_of(AttentionKeeper)


@pytest.mark.parametrize("left_pad", [False, True])
def test_offload_reuses_forward_attention(tiny_model_dir, keepers, left_pad):
    """With "offload" the recompute answers each layer's causal SDPA call from the forward's kept output and
    log-sum-exp (models/kept_attention.py): one replay per layer, gradients bit-equal to recomputing it. Left
    padding needs a mask, which is not kept: no replays, same gradients."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.train()
    randomize_lora_b(model)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :6] = 0
    _, ref = _grads(model, True, ids, mask)
    assert keepers == []  # on-device recompute keeps nothing: the outputs would cost GPU memory
    _, got = _grads(model, "offload", ids, mask)
    assert [k.replays for k in keepers] == [0 if left_pad else model.arch.num_layers]
    assert all(not k.records for k in keepers)  # every kept result was used (and released) by backward
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


@pytest.mark.parametrize("mode", [True, "offload"])
def test_first_layer_without_trainable_parameters(tiny_model_dir, mode):
    """The first layer's input (frozen embedding rows) needs no gradient, so its recompute computes none; with that
    layer's adapters frozen too, nothing in its recompute needs a gradient and backward skips it, while the other
    layers' gradients equal no checkpointing's."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.train()
    randomize_lora_b(model)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    _, ref = _grads(model, False, ids, mask)
    _, got = _grads(model, mode, ids, mask)
    assert got.keys() == ref.keys() and not any(".layers.0." in n for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", ["llama", "qwen3_5_text"])
@pytest.mark.parametrize("mode", [True, "offload"])
def test_recomputing_the_first_layers_only_equals_no_checkpointing(tiny_model_dir, family, mode, monkeypatch):
    """recompute_layers=n (what use_gradient_checkpointing="auto" picks when memory is between the two modes): the
    first n layers are recomputed, the later ones keep their activations; the gradients are no checkpointing's."""
    from fasttune.models import decoder

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1)
    model.train()
    randomize_lora_b(model)
    calls = []
    real = decoder.offloaded_layer
    monkeypatch.setattr(decoder, "offloaded_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    loss, ref = _grads(model, False, ids, mask)
    layers = model.arch.num_layers
    for count in (1, 0, layers):
        model.gradient_checkpointing = mode
        model.recompute_layers = count
        calls.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        assert len(calls) == count  # the recomputed layers (each recomputed layer's forward goes through it)
        torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-6, atol=1e-6)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_recompute_layers_is_checked_and_reset_by_a_mode(tiny_model_dir):
    from fasttune.errors import ConfigError

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    for bad in (-1, model.arch.num_layers + 1, 1.5, True):
        with pytest.raises(ConfigError, match="recompute_layers"):
            model.recompute_layers = bad
    model.recompute_layers = 1
    model.gradient_checkpointing_enable()  # an explicit mode (TRL's and transformers' call) covers every layer
    assert model.recompute_layers is None and model.gradient_checkpointing is True


@pytest.mark.parametrize("family", ["qwen_vl_dir", "llava_vl_dir"])
def test_a_training_vision_tower_recomputes_with_the_decoder(family, request):
    """finetune_vision_layers=True: with the decoder recomputing, the tower recomputes too (transformers' own
    checkpointing of its layers, non-reentrant); the LoRA gradients, the tower's included, equal no recompute's."""
    from fasttune import FastVisionModel
    from fasttune.data.vision_rows import VisionEncoder, collate_vision
    from tiny_vision import noise_image

    model, proc = FastVisionModel.from_pretrained(str(request.getfixturevalue(family)), dtype=torch.float32,
                                                  device="cpu")
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, use_gradient_checkpointing=True)
    tower = next(getattr(model, a) for a, _ in model.family.vision_modules
                 if getattr(getattr(model, a), "supports_gradient_checkpointing", False))
    assert tower.is_gradient_checkpointing
    model.train()
    randomize_lora_b(model)
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": noise_image((56, 56), 3)},
                                                     {"type": "text", "text": "what?"}]},
                        {"role": "assistant", "content": "noise"}]}
    batch = collate_vision([VisionEncoder(proc, 512, False).encode(row, 0)], proc)
    calls = []
    # (inside the layer: transformers 5.25 checkpoints a layer's forward, so hooks on the layer itself stay outside;
    # its attention, not its MLP, since torch's recompute stops once it has every saved value back)
    attn = next(m for n, m in tower.named_modules() if n.endswith(("blocks.0.attn", "layers.0.self_attn")))
    attn.register_forward_hook(lambda *_: calls.append(1))
    grads = {}
    for mode in (True, False):
        model.gradient_checkpointing = mode
        assert tower.is_gradient_checkpointing == mode
        calls.clear()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        assert len(calls) == (2 if mode else 1)  # the tower's first attention: forward, and recomputed in backward
        # (LLaVA's tower layers past the selected one get no gradient either way)
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(".lora_" in n and n.startswith(tuple(a for a, _ in model.family.vision_modules)) for n in grads[True])
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-6, msg=n)
