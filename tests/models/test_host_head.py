"""offload_lm_head=True: the frozen LM head stays in host memory and is streamed in tiles; loss, gradients, logits,
GRPO-style log-probs and generation match the device head, and conflicting options are refused."""
import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.kernels import streamed_head
from fasttune.models.host_head import HostLMHead
from fasttune.train.objectives.reference import model_token_logprobs


@pytest.fixture
def pair(tiny_model_dir, monkeypatch):
    """(device head, host head) twins of the untied tiny llama, LoRA on both, tiles of 64 rows (300-token vocab:
    five tiles, the last partial)."""
    monkeypatch.setattr(streamed_head, "TILE_ROWS", 64)
    models = []
    for host in (False, True):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32,
                                                     offload_lm_head=host, offload_embedding=host)
        models.append(FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0))
    return models


def test_loss_grads_and_logits_match_the_device_head(pair):
    ref, ours = pair
    assert isinstance(ours.lm_head, HostLMHead) and ours.lm_head.weight.device.type == "cpu"
    assert not ours.lm_head.weight.requires_grad
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :4] = -100
    grads, losses = [], []
    for model in (ref, ours):
        out = model(ids, labels=labels, return_logits=True)
        out.loss.backward()
        losses.append((out.loss.detach(), out.logits.detach()))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_scored_logprobs_and_generation_match(pair):
    ref, ours = pair
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    got, grads = [], []
    for model in (ref, ours):
        got.append(model_token_logprobs(model, ids, mask, mask, last=4, temperature=0.8))
        (got[-1] * torch.arange(4.0)).sum().backward()  # GRPO-like: a gradient per log-prob
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(got[1], got[0], rtol=1e-6, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    # DPO's / KTO's extras (entropy, mean logit, first-argmax hit, log sum p^2) from the streamed tiles too
    both = [model_token_logprobs(model, ids, mask, mask, extras=True) for model in (ref, ours)]
    for a, b in zip(*both):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    prompt = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False),
                       ref.generate(prompt, max_new_tokens=6, do_sample=False))
    assert isinstance(ours.lm_head, HostLMHead)


def test_moves_keep_the_head_on_the_host(pair):
    _, ours = pair
    ours.to(torch.float64)
    head = ours.lm_head
    assert isinstance(head, HostLMHead) and head.weight.device.type == "cpu" and head.weight.dtype == torch.float64
    assert ours(torch.tensor([[1, 2, 3]])).logits.dtype == torch.float64


def test_new_tokens_grow_the_host_head(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32,
                                                 offload_lm_head=True)
    model.resize_token_embeddings(310)
    head = model.lm_head
    assert isinstance(head, HostLMHead) and head.weight.shape == (310, 64) and head.weight.device.type == "cpu"
    assert model(torch.tensor([[309, 1]])).logits.shape == (1, 2, 310)


def test_refusals_name_the_conflict(tiny_model_dir):
    untied = str(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(untied, offload_lm_head=True, full_finetuning=True)
    with pytest.raises(ConfigError, match="ties its LM head"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), offload_lm_head=True)
    model, _ = FastLanguageModel.from_pretrained(untied, dtype=torch.float32, offload_lm_head=True)
    with pytest.raises(ConfigError, match="offload_lm_head"):
        FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["lm_head"])
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="made trainable"):
        model(torch.tensor([[1, 2]]))


def test_dft_loss_and_label_smoothing_are_refused_with_the_streamed_head(pair):
    _, ours = pair
    ids = torch.randint(0, 300, (1, 6))
    with pytest.raises(ConfigError, match="loss_type='dft' is not implemented with offload_lm_head"):
        ours(ids, labels=ids, dft=True)
    with pytest.raises(ConfigError, match="label_smoothing_factor is not implemented with offload_lm_head"):
        ours(ids, labels=ids, smoothing=0.1)
