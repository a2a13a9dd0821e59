"""GPU checks (skipped without CUDA) of sequence classifiers (models/sequence_classification.py): our kernels and
recompute modes against transformers' <Family>ForSequenceClassification + PEFT."""
import pytest
import torch
from peft_oracle import peft_grads, randomize_lora_b
from tiny import hf_model, save_hf
from transformers import AutoModelForSequenceClassification

from fasttune import FastLanguageModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PAD = 0


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (3, 40), generator=g)
    ids[0, 31:] = PAD  # right padding
    ids[1, :12] = PAD  # left padding
    return ids.cuda(), (ids != PAD).long().cuda(), torch.tensor([1, 0, 2], device="cuda")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_bf16_scores_close_to_transformers(family, tmp_path):
    """bf16 scores: our error against transformers' fp32 classifier is no worse than transformers' own bf16 one."""
    save_hf(hf_model(family), tmp_path)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16, device="cuda", num_labels=3,
                                                auto_model=AutoModelForSequenceClassification)
    exact = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3, dtype=torch.float32).cuda()
    with torch.no_grad():
        exact.score.weight.copy_(ours.score.weight.float())
    half = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3,
                                                              dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        half.score.weight.copy_(ours.score.weight)
    ids, mask, _ = _batch()
    with torch.no_grad():
        want = exact(input_ids=ids, attention_mask=mask).logits
        a = ours(input_ids=ids, attention_mask=mask).logits.float()
        b = half(input_ids=ids, attention_mask=mask).logits.float()
    assert (a - want).norm() < 1.5 * (b - want).norm() + 1e-3 * want.norm()


@pytest.mark.parametrize("mode", [False, True, "offload"])
def test_lora_gradients_equal_peft_fp32(mode, tmp_path):
    """fp32 on the card, each recompute mode: loss and every trainable gradient equal PEFT's SEQ_CLS model's."""
    from peft import PeftModel

    save_hf(hf_model("llama"), tmp_path / "base")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, device="cuda",
                                                num_labels=3, auto_model=AutoModelForSequenceClassification)
    ours = FastLanguageModel.get_peft_model(ours, r=4, use_gradient_checkpointing=mode)
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=3,
                                                              dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask, labels = _batch()
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = ref(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    theirs = peft_grads(ref)
    for n, p in ours.named_parameters():
        if p.requires_grad:
            key = n.removesuffix(".weight") if ".lora_" in n else n
            torch.testing.assert_close(p.grad, theirs[key], rtol=1e-4, atol=1e-6, msg=n)
