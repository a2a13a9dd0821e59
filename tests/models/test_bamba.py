"""Bamba (transformers' BambaForCausalLM: IBM's Bamba-9B) on our decoder: Granite 4.0's Mamba-2 layers
(models/mamba2.py) around attention layers that rotate half of each head, a Llama MLP named feed_forward. The family
tests (tests/tiny.py's FAMILIES) cover logits, LoRA gradients against PEFT, generation, merging and GGUF in llama.cpp
(llama.cpp's granitehybrid, partial RoPE's pairs reordered in the rotated half only); here its config."""
import pytest

from fasttune.errors import ModelLoadError
from fasttune.models.config import ModelConfig

# config.json as IBM's Bamba-9B ships it (sizes shrunk)
ORIGINAL = dict(model_type="bamba", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8,
                mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2, mamba_d_conv=4,
                z_loss_coefficient=0.0, rms_norm_eps=1e-5)


def test_fields_from_the_original_config_json():
    arch = ModelConfig.from_hf(ORIGINAL)
    assert arch.linear_layers == [True, False, True, True] and arch.linear_kind == "mamba2"
    assert (arch.mamba_heads, arch.mamba_head_dim, arch.mamba_groups, arch.mamba_state) == (8, 16, 2, 8)
    assert arch.rotary_dim == 8 and arch.module_name("mlp") == "feed_forward" and arch.mlp_gated
    assert ModelConfig.from_hf({**ORIGINAL, "mamba_d_head": "auto"}).mamba_head_dim == 16


def test_a_z_loss_is_refused_by_name():
    with pytest.raises(ModelLoadError, match="z_loss_coefficient=0.001.*fast=False"):
        ModelConfig.from_hf({**ORIGINAL, "z_loss_coefficient": 0.001})
    with pytest.raises(ModelLoadError, match="Bamba config's Mamba sizes do not fit"):
        ModelConfig.from_hf({**ORIGINAL, "mamba_d_head": 12})
