"""Ernie 4.5: Llama's decoder with adjacent-pair RoPE (channels 2i and 2i + 1 rotate together) and optional biases."""
import torch
from peft_oracle import assert_grads_close, peft_grads, peft_twin, randomize_lora_b
from tiny import hf_model, right_padded_batch, save_hf

from fasttune import FastLanguageModel


def test_biased_model_and_its_lora_grads_equal_transformers_and_peft(tmp_path):
    """use_bias=True (every projection biased) with right padding: logits equal transformers', LoRA grads PEFT's;
    the half-split RoPE of other families would give other logits (the pairing is what is tested)."""
    folder = save_hf(hf_model("ernie4_5", use_bias=True), tmp_path / "m")
    hf = hf_model("ernie4_5", use_bias=True)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ids, mask = right_padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
        for layer in ours.model.layers:
            layer.self_attn.reorder_pairs = False
        assert (ours(ids, attention_mask=mask).logits - want)[valid].abs().max() > 1e-3
        for layer in ours.model.layers:
            layer.self_attn.reorder_pairs = True
    model = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    twin = peft_twin("ernie4_5", tmp_path / "adapter", use_bias=True)
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    twin(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = peft_grads(twin)
    mine = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 2 * 7
    assert_grads_close(mine, theirs)
