"""offload_embedding on the GPU (skipped without CUDA): rows read from pinned host memory by the kernel, equal
values, inside CUDA-graph decoding too, and the table's bytes off the card."""
import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.models.host_embedding import HostEmbedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _nf4_pair(folder, option: str) -> list:
    """[(model, GPU bytes it took)] for the tiny NF4 model loaded without and with `option`=True."""
    pair = []
    for on in (False, True):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda",
                                                     load_in_4bit=True, **{option: on})
        pair.append((model, torch.cuda.memory_allocated() - before))
    return pair


def test_qlora_logits_grads_generation_and_memory(tiny_model_dir):
    (ref, ref_bytes), (ours, our_bytes) = _nf4_pair(tiny_model_dir("llama", vocab_size=32000), "offload_embedding")
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


def test_host_lm_head_bf16_qlora_matches_device_head(tiny_model_dir, monkeypatch):
    """offload_lm_head on the card: the head's bytes leave it, the streamed loss equals the fused chunked loss within
    bf16 rounding, LoRA gradients agree to bf16 accuracy, greedy generation (head brought over) is identical."""
    from fasttune.kernels import streamed_head
    from fasttune.models.host_head import HostLMHead

    monkeypatch.setattr(streamed_head, "TILE_ROWS", 4096)  # 8 tiles over the 32,000 rows, the last partial
    (ref, ref_bytes), (ours, our_bytes) = _nf4_pair(tiny_model_dir("llama", vocab_size=32000), "offload_lm_head")
    ref, ours = (FastLanguageModel.get_peft_model(m, r=8, lora_alpha=16, random_state=0) for m in (ref, ours))
    assert isinstance(ours.lm_head, HostLMHead) and ours.lm_head.weight.is_pinned()
    assert ref_bytes - our_bytes >= 32000 * 64 * 2
    ids = torch.randint(3, 32000, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses, grads = [], []
    for model in (ref, ours):
        out = model(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach().float())
        grads.append(torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad]))
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=0)
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 2e-2
    prompt = ids[:1, :12]
    assert torch.equal(ours.generate(prompt, max_new_tokens=20, do_sample=False),
                       ref.generate(prompt, max_new_tokens=20, do_sample=False))
    assert isinstance(ours.lm_head, HostLMHead)
