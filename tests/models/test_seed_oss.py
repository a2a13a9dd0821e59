"""Seed-OSS: Llama's decoder with q/k/v biases and an o_proj bias of its own switch (attention_out_bias). The shared
family tests (tests/tiny.py's FAMILIES) run Seed-OSS-36B's layout (q/k/v biases only, which llama.cpp's seed_oss
reads); here every bias is on, the dropout fields warn, and GGUF refuses the biases llama.cpp lacks."""
import pytest
import torch
from peft_oracle import assert_grads_close, peft_grads, peft_twin, randomize_lora_b
from tiny import hf_model, right_padded_batch, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError

pytest.importorskip("transformers.models.seed_oss")
BIASES = dict(attention_out_bias=True, mlp_bias=True)


def test_every_bias_equals_transformers_and_peft_and_gguf_refuses_them(tmp_path):
    """attention_out_bias and mlp_bias on (and right padding): logits equal transformers', LoRA gradients PEFT's;
    without the o_proj bias the logits differ (the switch is read); GGUF export refuses before writing."""
    folder = save_hf(hf_model("seed_oss", **BIASES), tmp_path / "m")
    hf = hf_model("seed_oss", **BIASES)
    ours, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    assert ours.arch.attn_bias and ours.arch.o_bias and ours.arch.mlp_bias
    ids, mask = right_padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[valid], want[valid], rtol=1e-5, atol=1e-5)
        unbiased = hf_model("seed_oss", mlp_bias=True)  # the same seed, no o_proj bias
        assert (unbiased(input_ids=ids, attention_mask=mask).logits - want)[valid].abs().max() > 1e-4
    model = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    twin = peft_twin("seed_oss", tmp_path / "adapter", **BIASES)
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    twin(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    mine = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(mine) == 2 * 2 * 7
    assert_grads_close(mine, peft_grads(twin))
    with pytest.raises(ConfigError, match="llama.cpp's seed_oss reads only the q/k/v biases"):
        model.save_pretrained_gguf(str(tmp_path / "m.gguf"), tok)
    assert not (tmp_path / "m.gguf").exists()


def test_the_checkpoints_dropout_is_named(tmp_path):
    """Seed-OSS-36B's config.json has attention_dropout and residual_dropout 0.1, which fasttune's decoder does not
    apply: a warning names both."""
    folder = save_hf(hf_model("seed_oss", attention_dropout=0.1, residual_dropout=0.1), tmp_path / "d")
    with pytest.warns(UserWarning, match="attention_dropout=0.1, residual_dropout=0.1 are not applied"):
        FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
