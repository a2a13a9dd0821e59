"""Falcon-H1 (transformers' FalconH1ForCausalLM) on our decoder: attention and a Mamba-2 mixer (models/mamba2.py) side
by side in every layer, with Falcon-H1's µP multipliers. The family tests (tests/tiny.py's FAMILIES, multipliers away
from 1) cover logits, LoRA gradients against PEFT, generation, merging and llama.cpp's logits on the GGUF (f16, q8_0);
here what is Falcon-H1's own, the GGUF's folded multipliers against transformers included."""
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


def test_lora_keeps_to_what_peft_accepts_and_gguf_refuses_the_norm_before_the_gate(tmp_path, tiny_tokenizer):
    """PEFT refuses LoRA on a Mamba layer's out_proj in falcon_h1 models; the tiny model norms its Mamba output before
    the gate, which llama.cpp's falcon-h1 cannot (it norms after): the GGUF export is refused before anything is
    written."""
    _, model = _pair(tmp_path / "m", tiny_tokenizer)
    with pytest.raises(ConfigError, match="PEFT refuses LoRA on a Mamba layer's out_proj"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "out_proj"])
    with pytest.raises(ConfigError, match="mamba_norm_before_gate=true"):
        model.save_pretrained_gguf(tmp_path / "m.gguf", tiny_tokenizer, quantization_method="f16", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("overrides, match", [({"attention_bias": True}, "attention_bias=true"),
                                              ({"projectors_bias": True}, "projectors_bias=true"),
                                              ({"hidden_act": "gelu"}, "hidden_act 'gelu'")])
def test_gguf_refuses_what_llama_cpp_computes_otherwise(overrides, match):
    """llama.cpp's falcon-h1 drops o_proj's bias, reads no Mamba projection biases and runs SiLU only: each is a
    ConfigError naming the config field (checked before anything is written, as above)."""
    from tiny import hf_config

    from fasttune.export.gguf_layouts import check_supported

    check_supported(ModelConfig.from_hf(hf_config("falcon_h1", mamba_norm_before_gate=False)))  # (exportable)
    with pytest.raises(ConfigError, match=match):
        check_supported(ModelConfig.from_hf(hf_config("falcon_h1", mamba_norm_before_gate=False, **overrides)))


@pytest.mark.parametrize("overrides", [{"mamba_norm_before_gate": False},
                                       {"mamba_rms_norm": False, "tie_word_embeddings": True, "mlp_bias": True,
                                        "mamba_conv_bias": False, "mamba_d_ssm": 96, "mamba_n_heads": 6}],
                         ids=["norm-after-gate", "no-norm-tied-biases-narrow-mamba"])
def test_gguf_in_llama_cpp_equals_transformers(overrides, tmp_path):
    """The f16 GGUF (µP multipliers folded into the weights, as llama.cpp's converter does) gives transformers' logits
    in llama.cpp: every multiplier away from 1; tied embeddings get their own scaled output tensor, a conv without
    bias a zero one (llama.cpp's graph adds it unconditionally), no gated norm no ssm_norm; Mamba layers narrower than
    twice the model (mamba_d_ssm, as Falcon-H1's releases: llama.cpp's falcon-h1 reads the width)."""
    pytest.importorskip("llama_cpp")
    import gguf
    from bpe_tokenizers import make_bpe_tokenizer
    from llama_cpp_check import PROMPTS, compare_logits

    bpe = make_bpe_tokenizer("gpt2")
    # (weights drawn 5x wider than the tiny default: each multiplier then moves the logits by 3% of their range or
    # more, where at 0.02 key_multiplier's and the MLP's moved them by 1e-3, under f16's rounding)
    hf, model = saved_pair("falcon_h1", tmp_path / "m", bpe, vocab_size=416, initializer_range=0.1, **overrides)
    path = model.save_pretrained_gguf(tmp_path / "m.gguf", bpe, quantization_method="f16", progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in tensors and ("blk.0.ssm_norm.weight" in tensors) == overrides.get("mamba_rms_norm", True)
    if not overrides.get("mamba_conv_bias", True):
        assert not tensors["blk.1.ssm_conv1d.bias"].data.any()
    rel, top1, _ = compare_logits(hf, bpe, path, PROMPTS, f32_cache=True)
    print(f"llama.cpp vs transformers: rel {rel:.2e} top-1 {top1:.3f}")
    assert rel < 2e-3 and top1 == 1.0, (rel, top1)
