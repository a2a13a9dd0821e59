"""offload_embedding on the GPU (skipped without CUDA): rows read from pinned host memory by the kernel, equal
values, inside CUDA-graph decoding too, and the table's bytes off the card."""
import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.models.host_embedding import HostEmbedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_logits_grads_generation_and_memory(tiny_model_dir):
    folder = tiny_model_dir("llama", vocab_size=32000)
    models = {}
    for offload in (False, True):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda",
                                                     load_in_4bit=True, offload_embedding=offload)
        models[offload] = (model, torch.cuda.memory_allocated() - before)
    (ref, ref_bytes), (ours, our_bytes) = models[False], models[True]
    emb = ours.model.embed_tokens
    assert isinstance(emb, HostEmbedding) and emb.weight.is_pinned()
    assert ref_bytes - our_bytes >= 32000 * 64 * 2  # the bf16 table left the card
    ids = torch.randint(3, 32000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(ours(ids).logits, ref(ids).logits)
    prompt = ids[:1, :12]
    assert torch.equal(ours.generate(prompt, max_new_tokens=20, do_sample=False),
                       ref.generate(prompt, max_new_tokens=20, do_sample=False))
    grads = []
    for model in (ref, ours):
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.lora_A.grad)
    assert grads[0] is not None and torch.equal(grads[0], grads[1])
