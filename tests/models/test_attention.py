"""models/attention.py's causal path pads rows to a multiple of SHAPE_STEP on the GPU (cuDNN plans one kernel per
sequence length): the real positions' outputs and every gradient are the unpadded call's. On the CPU the padding is
forced to test the arithmetic; on the GPU it runs as in training (bf16), also under "offload"'s kept attention."""
import pytest
import torch
import torch.nn.functional as F

from fasttune.models import attention as attn


def _qkv(t, device, dtype, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, t, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv)]


def _run(q, k, v):
    out = attn.attention(q, k, v, None, q.shape[-1] ** -0.5, None)
    grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.shape[2], device=out.device)[:, None]).sum(),
                                (q, k, v))
    return out, grads


def test_padded_rows_give_the_unpadded_values_and_gradients(monkeypatch):
    q, k, v = _qkv(37, "cpu", torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want_grads = torch.autograd.grad((want * torch.linspace(-1, 1, 37)[:, None]).sum(), (q, k, v))
    monkeypatch.setattr(attn, "shape_padding", lambda q, k: -q.shape[2] % attn.SHAPE_STEP)
    out, grads = _run(q, k, v)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_padding_applies_to_16_bit_causal_rows_on_the_gpu_only():
    q = torch.empty(1, 2, 100, 8)
    assert attn.shape_padding(q, q) == 0  # CPU
    if torch.cuda.is_available():
        cuda = q.to("cuda", torch.bfloat16)
        assert attn.shape_padding(cuda, cuda) == 28 and attn.shape_padding(cuda[:, :, :64], cuda[:, :, :64]) == 0
        assert attn.shape_padding(cuda.float(), cuda.float()) == 0
        assert attn.shape_padding(cuda[:, :, :1], cuda) == 0  # a decode step over a cache
        long = torch.empty(1, 1, attn.PADDED_ROWS_MAX + 1, 8, device="cuda", dtype=torch.bfloat16)
        assert attn.shape_padding(long, long) == 0  # long rows: the plan is cheap beside the step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_padded_rows_equal_sdpa_on_the_rows_alone():
    q, k, v = _qkv(777, "cuda", torch.bfloat16, hq=8, hkv=2, d=128)
    out, grads = _run(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want_grads = torch.autograd.grad((want.float() * torch.linspace(-1, 1, 777, device="cuda")[:, None]).sum(),
                                     (q, k, v))
    # the kernels' tiles start at the same key positions either way: at most a bf16 step apart
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def _mode_grads(tiny_model_dir, modes, dtype, device, seed) -> dict:
    """{mode: LoRA gradients} of the tiny llama (LoRA B random) on one batch of 2 x 40 tokens, per recompute mode."""
    from peft_oracle import randomize_lora_b

    from fasttune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=dtype, device=device)
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.train()
    randomize_lora_b(model)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(seed)).to(device)
    grads = {}
    for mode in modes:
        model.gradient_checkpointing = mode
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offload_replays_padded_attention(tiny_model_dir, instances_of):
    """"offload" keeps the padded call's output and answers the recompute's (padded) call with it: gradients equal
    recomputing it, one replay a layer."""
    from fasttune.models.kept_attention import AttentionKeeper

    keepers = instances_of(AttentionKeeper)
    grads = _mode_grads(tiny_model_dir, (True, "offload"), torch.bfloat16, "cuda", 1)
    assert [k.replays for k in keepers] == [2]  # (the tiny llama's two layers)
    for n, g in grads[True].items():
        assert torch.equal(grads["offload"][n], g), n


def test_offload_with_kept_blocks_and_padded_rows_equals_recompute(tiny_model_dir, monkeypatch, instances_of):
    """The padding forced on the CPU, where "offload" also keeps each layer's q/k/v and residual (kept_block.py) and
    the attention output: the recompute's padded call is answered from the kept one, gradients equal recomputing."""
    from fasttune.models.kept_attention import AttentionKeeper

    keepers = instances_of(AttentionKeeper)
    monkeypatch.setattr(attn, "shape_padding", lambda q, k: -q.shape[2] % attn.SHAPE_STEP)
    grads = _mode_grads(tiny_model_dir, (False, "offload"), torch.float32, "cpu", 2)
    assert [k.replays for k in keepers] == [2]
    for n, g in grads[False].items():
        torch.testing.assert_close(grads["offload"][n], g, rtol=1e-5, atol=1e-6, msg=n)
