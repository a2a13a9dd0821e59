"""Lean saves on the card (skipped without CUDA): bf16 activations through the real Triton kernels give bitwise the
gradients of keeping the values, and the saved bytes fall by what memory_policy.lean_values counts."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.train.memory_policy import lean_values

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "qwen3_moe", "mixtral", "gpt_oss"])
def test_bf16_lean_saves_bitwise_and_counted(family, tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.bfloat16, device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    ids = torch.randint(3, 300, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    results = []
    for lean in (False, True):
        model.lean_saves = lean
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                        sum(storages.values())))
        model.zero_grad(set_to_none=True)
    (loss, grads, full), (lean_loss, lean_grads, lean) = results
    assert torch.equal(loss, lean_loss)
    for n, g in grads.items():
        assert torch.equal(lean_grads[n], g), n
    assert full - lean == sum(lean_values(model)) * ids.numel() * 2
