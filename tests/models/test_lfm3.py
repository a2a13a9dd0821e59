"""LFM3 (LiquidAI's LFM3 layout) on our decoder: LFM2's short convolutions (kernel 7) beside sliding-window and full
attention layers, Gemma 2's four norms per layer (operator_norm / post_operator_norm / ffn_norm / post_ffn_norm), a
sigmoid gate per attention head (g_proj, stored as self_attn.gate_proj), plain RoPE on the sliding layers and
proportional RoPE on the full ones. The family tests (tests/tiny.py's FAMILIES) cover logits with padding, LoRA
gradients against PEFT, generation, merging and weight decay; here what is LFM3's own."""
import pytest
import torch
from peft_oracle import check_recompute_gradients
from tiny import hf_config, hf_model

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.kernels.rope import rope_inv_freq
from fasttune.models.config import ModelConfig


@pytest.fixture
def folder(tmp_path, tiny_tokenizer):
    hf_model("lfm3").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_fields():
    arch = ModelConfig.from_hf(hf_config("lfm3"))
    assert arch.linear_layers == [True, False, False, True] and arch.linear_conv_kernel == 7
    assert arch.sliding_windows == [None, 4, None, None] and arch.rope_local_theta == 10000.0
    assert arch.rope_scaling["rope_type"] == "proportional" and arch.rotary_dim == 16  # the whole head
    assert arch.sandwich_norm and arch.attn_head_gate and arch.qk_norm and arch.intermediate_size == 128
    plain = ModelConfig.from_hf({**hf_config("lfm3").to_dict(), "use_sandwich_norm": False,
                                 "use_attention_gate": False})
    assert not plain.sandwich_norm and not plain.attn_head_gate


def test_proportional_rope_equals_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config("lfm3", head_dim=64)
    want, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, "cpu", layer_type="full_attention")
    got = rope_inv_freq(64, 1e6, {"rope_type": "proportional", "partial_rotary_factor": 0.5})
    assert torch.equal(got, want) and (got[16:] == 0).all() and (got[:16] > 0).all()


def test_gate_proj_loads_as_g_proj_and_stays_out_of_the_defaults(folder):
    """LFM3 checkpoints store the head gate as self_attn.gate_proj, transformers' model names it g_proj (and PEFT's
    adapters with it); the default LoRA targets are the seven projections and the convolutions' two."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "model.layers.1.self_attn.gate_proj.weight" in f.keys()
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    hf = hf_model("lfm3")
    torch.testing.assert_close(model.model.layers[1].self_attn.g_proj.weight,
                               hf.model.layers[1].self_attn.g_proj.weight)
    lora = FastLanguageModel.get_peft_model(model, r=4)
    assert sorted(lora.lora_settings.target_modules) == ["in_proj", "k_proj", "o_proj", "out_proj", "q_proj",
                                                         "v_proj", "w1", "w2", "w3"]
    assert not any("g_proj.lora" in n for n, _ in lora.named_parameters())


def test_recompute_gives_the_same_gradients(folder):
    """Layer recompute and "offload" through the four-norm layers, the head gates and the convolutions."""
    check_recompute_gradients(folder)


def test_gguf_is_refused_by_name(folder, tmp_path, tiny_tokenizer):
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    with pytest.raises(ConfigError, match="this model is 'lfm3'"):
        model.save_pretrained_gguf(tmp_path / "out", tiny_tokenizer, quantization_method="f16", progress=False)
    assert not (tmp_path / "out").exists()

