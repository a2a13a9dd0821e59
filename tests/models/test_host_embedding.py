"""offload_embedding=True: the frozen input embedding stays in host memory, with the same values everywhere."""
import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.models.host_embedding import HostEmbedding


@pytest.fixture
def untied(tiny_model_dir):
    return tiny_model_dir("llama")


def test_same_logits_loss_and_lora_grads_as_the_device_embedding(untied):
    ref, _ = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32)
    ours, _ = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32, offload_embedding=True)
    assert isinstance(ours.model.embed_tokens, HostEmbedding)
    assert ours.get_input_embeddings() is ours.model.embed_tokens
    assert torch.equal(ours.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (ref, ours):
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    assert not ours.model.embed_tokens.weight.requires_grad


def test_moves_and_dtype_changes_keep_the_table_on_the_host(untied):
    model, _ = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32, offload_embedding=True)
    before = model.model.embed_tokens.weight.detach().clone()
    model.to("cpu")
    model.to(torch.float64)
    weight = model.model.embed_tokens.weight
    assert weight.device.type == "cpu" and weight.dtype == torch.float64 and not weight.requires_grad
    assert torch.equal(weight, before.double())
    assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.float64


def test_generate_equals_the_device_embedding(untied):
    ref, _ = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32)
    ours, _ = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32, offload_embedding=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False),
                       ref.generate(ids, max_new_tokens=6, do_sample=False))


def test_new_tokens_grow_the_host_table(untied, tiny_tokenizer):
    model, tok = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32, offload_embedding=True)
    model.resize_token_embeddings(310)
    emb = model.model.embed_tokens
    assert isinstance(emb, HostEmbedding) and emb.weight.shape == (310, 64) and emb.weight.device.type == "cpu"
    assert model(torch.tensor([[309, 1]])).logits.shape == (1, 2, 310)


def test_refusals_name_the_conflict(untied, tiny_model_dir):
    with pytest.raises(ConfigError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(str(untied), offload_embedding=True, full_finetuning=True)
    with pytest.raises(ConfigError, match="ties its LM head"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), offload_embedding=True)
    model, _ = FastLanguageModel.from_pretrained(str(untied), dtype=torch.float32, offload_embedding=True)
    with pytest.raises(ConfigError, match="offload_embedding"):
        FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["embed_tokens"])
