"""Nemotron-H (transformers' NemotronHForCausalLM: NVIDIA Nemotron-H, Nemotron Nano 2) on our decoder: layers of one
RMSNorm and one mixer (Mamba-2, attention without RoPE, or a ReLU² MLP), under transformers' names (backbone.* in the
checkpoints, model.embeddings, model.norm_f). The family tests (tests/tiny.py's FAMILIES) cover logits, LoRA gradients
against PEFT, generation, merging and GGUF in llama.cpp; here what is Nemotron-H's own."""
import warnings

import pytest
import torch
from peft_oracle import check_packed_documents, check_recompute_gradients
from tiny import hf_model

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.config import ModelConfig, decoder_runs
from fasttune.models.fallback import FallbackWarning

# config.json as NVIDIA's Nemotron Nano 2 ships it (sizes shrunk): the layers as hybrid_override_pattern's letters
ORIGINAL = dict(model_type="nemotron_h", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, hybrid_override_pattern="M-*-M",
                mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
                use_conv_bias=True, use_bias=False, mlp_hidden_act="relu2", layer_norm_epsilon=1e-5)


@pytest.fixture
def folder(tmp_path, tiny_tokenizer):
    """tests/tiny.py's Nemotron-H with the Mamba parameters drawn away from their initial values."""
    hf = hf_model("nemotron_h")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D", "conv1d.bias")):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_fields_from_the_original_config_json():
    arch = ModelConfig.from_hf(ORIGINAL)
    assert arch.layer_kinds == ["mamba", "mlp", "attention", "mlp", "mamba"]
    assert arch.linear_layers == [True, False, False, False, True] and arch.linear_kind == "mamba2"
    assert (arch.mamba_heads, arch.mamba_head_dim, arch.mamba_groups, arch.mamba_state) == (8, 16, 2, 8)
    assert arch.rope_layers == [False] * 5 and not arch.mlp_gated and arch.hidden_act == "relu2"
    assert arch.norm_scale_fp32 and arch.rms_norm_eps == 1e-5 and decoder_runs(ORIGINAL)


@pytest.mark.parametrize("change, match", [
    ({"hybrid_override_pattern": "M-X-M"}, "must name a kind per layer"),
    ({"hybrid_override_pattern": "M-*-"}, "names 4 layer kinds for 5 layers"),
    ({"n_groups": 3}, "must divide mamba_num_heads")])
def test_bad_configs_are_load_errors(change, match):
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_hf({**ORIGINAL, **change})


def test_checkpoint_names_read_and_written_as_transformers(folder, tmp_path):
    """The checkpoint's backbone.embeddings / backbone.norm_f load into our embedding and final norm, and a merged
    checkpoint writes them back as transformers 5 names them (model.embeddings, model.norm_f)."""
    from safetensors import safe_open

    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(model.model.embed_tokens.weight, f.get_tensor("backbone.embeddings.weight"))
        torch.testing.assert_close(model.model.norm.weight, f.get_tensor("backbone.norm_f.weight"))
    model.save_pretrained_merged(tmp_path / "merged", tok)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.embeddings.weight", "model.norm_f.weight", "model.layers.0.mixer.A_log"} <= names
    assert not any("embed_tokens" in n or n.startswith("model.norm.") for n in names)


def test_packed_documents_do_not_share_a_state(folder):
    check_packed_documents(FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)[0])


def test_recompute_gives_the_same_gradients(folder):
    check_recompute_gradients(folder)


def test_lora_keeps_to_what_peft_accepts(folder):
    """PEFT refuses LoRA on a Mamba layer's out_proj / conv1d in nemotron_h models: the default targets adapt in_proj
    (and attention, the MLPs), "all-linear" leaves out_proj out, and naming it is a ConfigError, so every adapter
    loads in PEFT (the family test loads one)."""
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    lora = FastLanguageModel.get_peft_model(model, r=4)
    assert sorted(lora.lora_settings.target_modules) == ["down_proj", "in_proj", "k_proj", "o_proj", "q_proj",
                                                         "up_proj", "v_proj"]
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    every = FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
    assert not any(".out_proj.lora_" in n for n, _ in every.named_parameters())
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    with pytest.raises(ConfigError, match="PEFT refuses LoRA on a Mamba layer's out_proj"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["in_proj", "out_proj"])


def test_latent_experts_go_to_the_fallback(tmp_path, tiny_tokenizer):
    """Experts behind latent projections (moe_latent_size) are not on our decoder yet: the transformers path loads
    the model whole, with its warning naming why, instead of dropping the projections."""
    assert decoder_runs({**ORIGINAL, "hybrid_override_pattern": "M-*EM"})
    assert not decoder_runs({**ORIGINAL, "hybrid_override_pattern": "M-*EM", "moe_latent_size": 16})
    hf = hf_model("nemotron_h_moe", moe_latent_size=16)
    hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert any(issubclass(w.category, FallbackWarning) and "latent projections" in str(w.message) for w in caught)
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits)


def test_loads_in_4bit_and_trains(folder):
    """QLoRA: the Mamba, attention and MLP projections load in NF4, and LoRA on them trains."""
    pytest.importorskip("bitsandbytes")
    from tiny import lora_losses

    from fasttune.peft.lora_layer import is_quantized

    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True)
    layers = model.model.layers
    assert all(is_quantized(m) for m in (layers[0].mixer.in_proj, layers[1].mixer.up_proj, layers[2].mixer.q_proj))
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = lora_losses(model, ids, steps=4)
    assert losses[-1] < losses[0]
