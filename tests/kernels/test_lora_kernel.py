"""The fused LoRA group (kernels/lora.py) against the module path (LoraLinear.forward under autograd) and fp64."""
import pytest
import torch
import torch.nn as nn

from fasttune.kernels.lora import lora_group
from fasttune.peft.lora import LoraLinear, can_fuse, project
from fasttune.quant.linear import QuantLinear
from kernel_check import assert_as_good_as_reference, dtypes_for_device

DEVICE, DTYPES = dtypes_for_device()


def _layers(in_features, outs, r, alpha, dropout=0.0, bias=False, seed=0):
    torch.manual_seed(seed)
    layers = []
    for out in outs:
        base = nn.Linear(in_features, out, bias=bias, device=DEVICE).requires_grad_(False)
        layer = LoraLinear(base, r, alpha / r, dropout)
        layer.reset_parameters()
        nn.init.normal_(layer.lora_B, std=0.5)  # B = 0 would hide every B-side gradient
        layers.append(layer)
    return layers


def _run(layers, x, grads_out, fused: bool, dtype):
    """Outputs, d(x) and every LoRA gradient, with the base in `dtype` and fp32 LoRA masters (as in training)."""
    for layer in layers:
        layer.base_layer.to(dtype)
        layer.lora_A.grad = layer.lora_B.grad = None
    x = x.to(dtype).detach().requires_grad_()
    torch.manual_seed(7)  # the same dropout masks on both paths
    outs = lora_group(x, layers) if fused else tuple(layer(x) for layer in layers)
    torch.autograd.backward(outs, [g.to(dtype) for g in grads_out])
    params = [t.grad for layer in layers for t in (layer.lora_A, layer.lora_B)]
    return [o.detach() for o in outs], x.grad, params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outs, r, alpha, dropout, bias", [
    ((40, 24, 24), 4, 8, 0.0, False),   # q/k/v-like group, scale 2
    ((77, 77), 3, 3, 0.0, True),        # gate/up-like pair with biases (Qwen2's q/k/v carry one)
    ((19,), 5, 10, 0.0, False),         # a single o/down projection
    ((40, 24, 24), 4, 8, 0.25, False),  # dropout: one mask per layer, as PEFT draws them
])
def test_group_matches_module_path(dtype, outs, r, alpha, dropout, bias, monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")  # the per-layer reference must not route through the group
    layers = _layers(33, outs, r, alpha, dropout, bias)
    torch.manual_seed(1)
    x = torch.randn(2, 11, 33, device=DEVICE)
    grads_out = [torch.randn(2, 11, o, device=DEVICE) for o in outs]
    ours = _run(layers, x, grads_out, True, dtype)
    ref = _run(layers, x, grads_out, False, dtype)
    exact = _run(layers, x.double(), [g.double() for g in grads_out], False, torch.float64)
    for name, a, b, e in [("out", ours[0], ref[0], exact[0]), ("dx", [ours[1]], [ref[1]], [exact[1]]),
                          ("lora grads", ours[2], ref[2], exact[2])]:
        for i, (ai, bi, ei) in enumerate(zip(a, b, e)):
            assert ai.dtype == bi.dtype and ai.shape == bi.shape, f"{name}[{i}]"
            assert_as_good_as_reference(ai, bi, ei, dtype, f"{name}[{i}]")


def _assert_fused_equals_module_path(layers, x_shape, rtol, atol):
    """fp32: outputs, d(x) and LoRA gradients of the fused group equal the module path's, element by element."""
    x = torch.randn(x_shape, device=DEVICE)
    grads_out = [torch.randn(*x_shape[:-1], layer.base_layer.out_features, device=DEVICE) for layer in layers]
    ours, ref = (_run(layers, x, grads_out, fused, torch.float32) for fused in (True, False))
    for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_dropout_masks_equal_module_path(monkeypatch):
    """With dropout the masks themselves must be PEFT's: exact equality in fp32, not just a small error."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    layers = _layers(16, (12, 8), 2, 4, dropout=0.5)
    _assert_fused_equals_module_path(layers, (3, 5, 16), rtol=1e-5, atol=1e-6)


def test_eval_mode_draws_no_dropout(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    layers = _layers(16, (12,), 2, 4, dropout=0.5)
    for layer in layers:
        layer.eval()
    x = torch.randn(4, 16, device=DEVICE)
    with torch.no_grad():
        a, b = layers[0](x), layers[0](x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_input_without_grad_skips_dx():
    layers = _layers(16, (12, 8), 2, 2)
    x = torch.randn(3, 16, device=DEVICE)  # like layer 0's normed embeddings under a frozen embedding
    outs = lora_group(x, layers)
    sum(o.sum() for o in outs).backward()
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in layers)
    assert layers[0].lora_A.grad.dtype == torch.float32


def test_nf4_base_matches_module_path(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    layers = _layers(128, (64, 32), 4, 8)
    for layer in layers:
        layer.base_layer = QuantLinear.from_linear(layer.base_layer, "nf4")
    _assert_fused_equals_module_path(layers, (2, 5, 128), rtol=1e-4, atol=1e-5)


def test_dispatch(monkeypatch):
    layers = _layers(8, (4, 4), 2, 2)
    x = torch.randn(2, 8, device=DEVICE)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    assert not can_fuse(x, layers)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    assert can_fuse(x, layers)
    layers[1].disabled = True  # adapters off (DPO's reference pass): the plain path
    assert not can_fuse(x, layers)
    torch.testing.assert_close(project(x, *layers)[1], layers[1].base_layer(x))
    assert not can_fuse(x, [layers[0], nn.Linear(8, 4, device=DEVICE)])


def test_frozen_adapters_pass_gradients_to_x_only():
    layers = _layers(16, (12, 8), 2, 2)
    for layer in layers:
        layer.requires_grad_(False)
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    sum(o.sum() for o in lora_group(x, layers)).backward()
    assert x.grad is not None and all(layer.lora_A.grad is None for layer in layers)
    torch.testing.assert_close(x.grad, torch.autograd.grad(sum(layer(x).sum() for layer in layers), x)[0])


def test_values_unused_skips_base_gemms_and_keeps_gradients(monkeypatch):
    """values_unused=True (a recompute whose output only feeds an add): no base weight is read in forward and
    the gradients are those of the full computation."""
    import fasttune.kernels.lora as lora_mod

    layers = _layers(16, (12,), 2, 4)
    x = torch.randn(3, 16, device=DEVICE)
    res, g = torch.randn(3, 12, device=DEVICE), torch.randn(3, 12, device=DEVICE)
    grads, real = [], lora_mod._base_weight
    for unused in (False, True):
        reads = []
        monkeypatch.setattr(lora_mod, "_base_weight", lambda layer, dtype: reads.append(1) or real(layer, dtype))
        xi = x.clone().requires_grad_()
        out = lora_group(xi, layers, values_unused=unused)[0]
        forward_reads = len(reads)
        (res + out).backward(g)
        assert forward_reads == (0 if unused else 1)
        grads.append([xi.grad, layers[0].lora_A.grad.clone(), layers[0].lora_B.grad.clone()])
        layers[0].zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_recompute_skips_down_proj_forward(tiny_model_dir, monkeypatch):
    """With per-layer recompute each layer's re-run reads every base weight but down_proj's."""
    import fasttune.kernels.lora as lora_mod
    from fasttune import FastLanguageModel

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    model.train()
    reads = []
    real = lora_mod._base_weight
    monkeypatch.setattr(lora_mod, "_base_weight", lambda layer, dtype: reads.append(1) or real(layer, dtype))
    ids = torch.randint(3, 300, (1, 8)).to(model.device)
    model(ids, labels=ids).loss.backward()
    layers = model.arch.num_layers
    # forward, recompute without down_proj, backward; no d(input) for the first layer's q/k/v (frozen embedding rows)
    assert len(reads) == layers * (7 + 6 + 7) - 3
