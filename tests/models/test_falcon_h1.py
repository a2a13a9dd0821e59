"""Falcon-H1 (transformers' FalconH1ForCausalLM) on our decoder: attention and a Mamba-2 mixer (models/mamba2.py) side
by side in every layer, with Falcon-H1's µP multipliers. The family tests (tests/tiny.py's FAMILIES, multipliers away
from 1) cover logits, LoRA gradients against PEFT, generation and merging; here what is Falcon-H1's own."""
import pytest
import torch
from peft_oracle import check_logits_generation_and_merged, check_packed_documents, check_recompute_gradients
from tiny import saved_pair

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.models.config import ModelConfig

def _pair(folder, tokenizer, **overrides):
    """transformers' tiny Falcon-H1 (its Mamba parameters drawn in tests/tiny.py) and ours, loaded in fp32."""
    return saved_pair("falcon_h1", folder, tokenizer, **overrides)


def test_fields():
    from tiny import hf_config

    arch = ModelConfig.from_hf(hf_config("falcon_h1"))
    assert arch.parallel_mamba and all(arch.linear_layers) and arch.linear_kind == "mamba2"
    assert arch.parallel_multipliers == (1.3, 0.8, 1.2, 0.6) and arch.mlp_multipliers == (1.4, 0.7)
    assert arch.ssm_multipliers == (1.1, 0.9, 1.2, 0.8, 1.3) and arch.embedding_multiplier == 3.0
    assert arch.logits_scaling == pytest.approx(1 / 0.4) and arch.scaling == pytest.approx(16 ** -0.5 * 0.7)
    assert arch.mamba_rms_norm and arch.mamba_norm_before_gate and arch.module_name("mlp") == "feed_forward"


@pytest.mark.parametrize("overrides", [{"mamba_rms_norm": False}, {"mamba_norm_before_gate": False}],
                         ids=["no-mamba-norm", "norm-after-gate"])
def test_mamba_norm_variants_equal_transformers(overrides, tmp_path, tiny_tokenizer):
    check_logits_generation_and_merged(*_pair(tmp_path / "m", tiny_tokenizer, **overrides), 40, tmp_path)


def test_given_embeddings_skip_the_embedding_multiplier(tmp_path, tiny_tokenizer):
    """transformers' FalconH1Model multiplies looked-up embeddings only (Granite's multiplies given ones too)."""
    hf, model = _pair(tmp_path / "m", tiny_tokenizer)
    ids = torch.randint(3, 300, (1, 12))
    embeds = hf.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits,
                                   rtol=1e-5, atol=1e-6)


def test_packing_and_recompute(tmp_path, tiny_tokenizer):
    _, model = _pair(tmp_path / "m", tiny_tokenizer)
    check_packed_documents(model)
    check_recompute_gradients(tmp_path / "m")


def test_lora_keeps_to_what_peft_accepts_and_gguf_is_refused(tmp_path, tiny_tokenizer):
    """PEFT refuses LoRA on a Mamba layer's out_proj in falcon_h1 models; the GGUF export is refused by name (llama.cpp
    reads Falcon-H1's multipliers folded into the weights), before anything is written."""
    _, model = _pair(tmp_path / "m", tiny_tokenizer)
    with pytest.raises(ConfigError, match="PEFT refuses LoRA on a Mamba layer's out_proj"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "out_proj"])
    with pytest.raises(ConfigError, match="GGUF export of Falcon-H1"):
        model.save_pretrained_gguf(tmp_path / "m.gguf", tiny_tokenizer, quantization_method="f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()
