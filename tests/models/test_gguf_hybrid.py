"""The Mamba-2 hybrids' GGUF files (llama.cpp's granitehybrid, nemotron_h / nemotron_h_moe, falcon-h1), which
transformers cannot read, load back onto our decoder: each family exported with random LoRA merged in (f32), then
read with FastLanguageModel.from_pretrained: the same config kind, every weight (to fp32 rounding), the same logits and
tokenizer. Bamba's file (granitehybrid too) reads back as Bamba; Falcon-H1's with its multipliers folded (every
multiplier 1, the same function). Plus the errors for what the files cannot say."""
import pytest
import torch
from bpe_tokenizers import make_bpe_tokenizer
from peft_oracle import randomize_lora_b
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.models.gguf_hybrid import hybrid_config

PROMPT = "The quick brown fox jumps over the lazy dog."
CASES = {"granitemoehybrid": {}, "granitemoehybrid_moe": {}, "bamba": {}, "nemotron_h": {}, "nemotron_h_moe": {},
         # (llama.cpp's falcon-h1 norms the Mamba output after the gate: the form its exporter accepts)
         "falcon_h1": {"mamba_norm_before_gate": False}}


@pytest.mark.parametrize("family", CASES)
def test_hybrid_gguf_loads_back_onto_our_decoder(family, tmp_path):
    bpe = make_bpe_tokenizer("gpt2")
    save_hf(hf_model(family, vocab_size=416, **CASES[family]), tmp_path / "m", bpe)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"))
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
    randomize_lora_b(model)
    model = FastLanguageModel.for_inference(model)
    path = model.save_pretrained_gguf(tmp_path / "m.f32.gguf", tok, quantization_method="f32", progress=False)
    back, back_tok = FastLanguageModel.from_pretrained(str(path))
    want_type = family.removesuffix("_moe") if family != "nemotron_h_moe" else "nemotron_h"
    assert back.arch.model_type == want_type and back.lora_settings is None
    assert back.arch.linear_layers == model.arch.linear_layers and back.arch.num_experts == model.arch.num_experts
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=2e-5)
    assert back_tok(PROMPT)["input_ids"] == ids[0].tolist()
    if family != "falcon_h1":  # (Falcon-H1's weights carry the folded multipliers)
        from fasttune.export.merged import merged_state_dict
        from fasttune.peft.adapter_io import checkpoint_names

        merged, hf_name = merged_state_dict(model, torch.float32), checkpoint_names(back)
        for name, value in back.state_dict().items():
            if name == "lm_head.weight" and back.arch.tie_embeddings:
                continue
            torch.testing.assert_close(value, merged[hf_name(name)], rtol=0, atol=1e-6, msg=name)


def _getter(**keys):
    base = {"block_count": 2, "embedding_length": 64, "attention.head_count": 4, "attention.head_count_kv": [0, 2],
            "attention.key_length": 16, "ssm.conv_kernel": 4, "ssm.state_size": 8, "ssm.group_count": 2,
            "ssm.inner_size": 128, "ssm.time_step_rank": 8, "feed_forward_length": 96}
    base.update(keys)
    return lambda key, default=None: base.get(key, default)


def test_what_the_files_cannot_say_is_a_load_error():
    get = _getter()
    with pytest.raises(ModelLoadError, match="lacks granitehybrid.ssm.inner_size"):
        hybrid_config(lambda k, d=None: None if k == "ssm.inner_size" else get(k, d), "granitehybrid", "x.gguf", set())
    with pytest.raises(ModelLoadError, match="rotates 8 of each head's 16"):  # partial RoPE beside multipliers
        hybrid_config(_getter(**{"rope.scaling.finetuned": True, "rope.dimension_count": 8, "embedding_scale": 12.0}),
                      "granitehybrid", "x.gguf", set())
    with pytest.raises(ModelLoadError, match="not a whole multiple"):
        hybrid_config(_getter(**{"ssm.inner_size": 96, "ssm.time_step_rank": 6}), "granitehybrid", "x.gguf", set())
    bamba = hybrid_config(_getter(**{"rope.scaling.finetuned": True, "rope.dimension_count": 8,
                                     "attention.scale": 0.25}), "granitehybrid", "x.gguf", {"blk.0.ssm_conv1d.bias"})
    assert bamba["model_type"] == "bamba" and bamba["attn_layer_indices"] == [1] and bamba["mamba_conv_bias"]
