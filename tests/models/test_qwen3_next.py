"""Qwen3-Next (Qwen3-Next-80B-A3B's layout) on our decoder: Qwen3.5-MoE's layers with the DeltaNet projections fused
per key head (in_proj_qkvz, in_proj_ba), plain partial RoPE and Qwen3-MoE's rule for which layers have experts.
Against transformers' Qwen3NextForCausalLM and PEFT on tiny random models (tests/tiny.py: 4 layers, 3 DeltaNet then
attention, 4 experts top 2 with a shared expert, layer 1 a dense MLP)."""
import pytest
import torch
from peft_oracle import check_logits_generation_and_merged, moe_adapter_grads
from tiny import hf_config, hf_model

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.models.config import ModelConfig


def _spread(model):
    """Decay rates and conv taps away from their initial values, so each shows in the outputs (own generator: the
    same draws whatever ran before)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "conv1d.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):
    hf = hf_model("qwen3_next")
    _spread(hf)
    hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    return hf, model


def test_fields():
    arch = ModelConfig.from_hf(hf_config("qwen3_next"))
    assert arch.linear_fused_projections and arch.linear_layers == [True, True, True, False]
    assert arch.moe_layers == [True, False, True, True] and arch.shared_expert_size == 48 and arch.norm_topk_prob
    assert arch.mrope_section is None and arch.rotary_dim == 4 and arch.attn_output_gate and arch.norm_offset == 1.0


def test_logits_generation_and_merged_equal_transformers(pair, tmp_path):
    """Over 64 positions (two chunks), left padding too; greedy generation through the cached states; a merged
    checkpoint after LoRA loads in transformers with our logits."""
    check_logits_generation_and_merged(*pair, 70, tmp_path)


def test_lora_equals_peft_and_adapts_the_fused_projections_and_experts(pair, tmp_path):
    """Default targets: attention and in_proj_qkvz / out_proj by name; the MLP names mean the routed experts, as PEFT
    maps them on Qwen3-Next (gate_up at rank 2r), so the shared expert and the dense MLP layer stay frozen; PEFT
    builds the same adapter from the saved config and its gradients equal ours."""
    _, model = pair
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("qwen3_next", ours, tmp_path, prepare_ref=_spread)  # the pair's values
    assert mine.keys() == theirs.keys()
    for part in (".linear_attn.in_proj_qkvz.lora_A", ".linear_attn.out_proj.lora_A", ".mlp.experts.lora_A"):
        assert any(part in n for n in mine), part
    assert not any("shared_expert." in n or "layers.1.mlp." in n for n in mine)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + 5e-6 * theirs[n].abs().max().item(), msg=n)


def test_gguf_with_dense_layers_between_is_refused(pair, tmp_path, tiny_tokenizer):
    """llama.cpp's qwen3next makes every layer sparse; the tiny model's layer 1 is dense (mlp_only_layers)."""
    _, model = pair
    with pytest.raises(ConfigError, match=r"dense MLP layers \(1"):
        model.save_pretrained_gguf(tmp_path / "out", tiny_tokenizer, quantization_method="f16", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_gguf_logits_equal_llama_cpp(tmp_path, quant):
    """llama.cpp's qwen3next: the fused projections (ssm_in, ssm_ba) in transformers' grouping per key head, the
    DeltaNet tensors as for qwen35 but without its tiled value-head order (which puts the logits 50% off here),
    experts and shared expert; every layer sparse. f32 within 1e-4 of the logit range, q8_0 within the family
    tests' bound."""
    from bpe_tokenizers import make_bpe_tokenizer
    from llama_cpp_check import compare_logits

    pytest.importorskip("llama_cpp")
    hf = hf_model("qwen3_next", vocab_size=416, mlp_only_layers=[])
    _spread(hf)
    bpe = make_bpe_tokenizer("gpt2")
    hf.save_pretrained(tmp_path / "m")
    bpe.save_pretrained(tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"))
    path = model.save_pretrained_gguf(tmp_path / f"m.{quant}.gguf", tok, quantization_method=quant, progress=False)
    rel, top1, _ = compare_logits(model, tok, path, ["The quick brown fox jumps over the lazy dog.",
                                                     "def add(a, b):\n    return a + b"])
    assert rel < {"f32": 1e-4, "q8_0": 5e-2}[quant] and top1 >= {"f32": 1.0, "q8_0": 0.9}[quant]
    if quant == "f32":  # and the file loads back onto our decoder (the fused projections as they were)
        back, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32)
        ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, model(ids).logits.float(), rtol=1e-5, atol=1e-5)
