"""Nemotron-H (transformers' NemotronHForCausalLM: NVIDIA Nemotron-H, Nemotron Nano 2) on our decoder: layers of one
RMSNorm and one mixer (Mamba-2, attention without RoPE, or a ReLU² MLP), under transformers' names (backbone.* in the
checkpoints, model.embeddings, model.norm_f). The family tests (tests/tiny.py's FAMILIES) cover logits, LoRA gradients
against PEFT, generation, merging and GGUF in llama.cpp; here what is Nemotron-H's own."""
import warnings

import pytest
import torch
from peft_oracle import (assert_grads_close, check_logits_generation_and_merged, check_packed_documents,
                         check_recompute_gradients, moe_adapter_grads)
from tiny import hf_model, save_hf

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
    """tests/tiny.py's Nemotron-H (its Mamba parameters drawn there), saved."""
    save_hf(hf_model("nemotron_h"), tmp_path / "m", tiny_tokenizer)
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


@pytest.fixture
def latent_folder(tmp_path, tiny_tokenizer):
    """Nemotron 3 Super's layout on tests/tiny.py's Nemotron 3: the routed experts behind 16-wide latent
    projections (moe_latent_size)."""
    hf = hf_model("nemotron_h_moe", moe_latent_size=16)
    save_hf(hf, tmp_path / "latent", tiny_tokenizer)
    return hf, tmp_path / "latent"


def test_latent_experts_logits_generation_and_merged_equal_transformers(latent_folder, tmp_path):
    """The experts run on fc1_latent_proj's output and go back through fc2_latent_proj (routing and the shared
    experts on the hidden state, as transformers' NemotronHMoE): on our decoder, no fallback warning."""
    hf, folder = latent_folder
    assert decoder_runs({**ORIGINAL, "hybrid_override_pattern": "M-*EM", "moe_latent_size": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    moe = model.model.layers[1].mixer
    assert model.arch.moe_latent_size == 16 and moe.fc1_latent_proj.weight.shape == (16, 64)
    assert moe.experts.up_proj.shape == (8, 32, 16) and moe.fc2_latent_proj.weight.shape == (64, 16)
    check_logits_generation_and_merged(hf, model, 30, tmp_path)


def test_latent_experts_lora_equals_peft(latent_folder, tmp_path):
    """LoRA on the routed experts (by default) and on the latent projections (named) against PEFT's."""
    model, _ = FastLanguageModel.from_pretrained(str(latent_folder[1]), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                            target_modules=["fc1_latent_proj", "fc2_latent_proj", "q_proj"],
                                            target_parameters=["mixer.experts.up_proj", "mixer.experts.down_proj"])
    mine, theirs = moe_adapter_grads("nemotron_h_moe", ours, tmp_path, moe_latent_size=16)
    assert mine.keys() == theirs.keys() and any(".fc1_latent_proj.lora_A" in n for n in mine)
    assert any(".mixer.experts.lora_A" in n for n in mine)
    assert_grads_close(mine, theirs)


def test_latent_experts_recompute_gives_the_same_gradients(latent_folder):
    check_recompute_gradients(latent_folder[1])


def test_config_json_read_as_json_equals_the_config_object(folder):
    """config.json as transformers 5 writes it (no num_hidden_layers: derived from the layer kinds; the time step's
    infinity as {"__float__": "Infinity"}), read as plain JSON, gives the fields AutoConfig's object gives."""
    import json

    from transformers import AutoConfig

    raw = json.loads((folder / "config.json").read_text())
    assert ModelConfig.from_hf(raw) == ModelConfig.from_hf(AutoConfig.from_pretrained(folder))
    assert ModelConfig.from_hf(raw).time_step_limit == (0.0, float("inf")) and decoder_runs(raw)


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


@pytest.fixture
def moe_folder(tmp_path, tiny_tokenizer):
    """tests/tiny.py's Nemotron 3 layout (the MLP layers as 8 ReLU² experts beside a shared one; the Mamba parameters
    and the routing bias drawn there) and its folder."""
    hf = hf_model("nemotron_h_moe")
    save_hf(hf, tmp_path / "moe", tiny_tokenizer)
    return hf, tmp_path / "moe"


def test_moe_fields_logits_generation_and_merged_equal_transformers(moe_folder, tmp_path):
    hf, folder = moe_folder
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    arch = model.arch
    assert arch.layer_kinds[1] == "moe" and arch.moe_layers == [False, True, False, True, False]
    assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size, arch.shared_expert_size) == \
        (8, 2, 32, 48) and not arch.experts_gated and arch.router_scoring == "sigmoid"
    assert arch.router_groups == (2, 1) and arch.routed_scaling == 2.5 and arch.moe_name == "mixer"
    assert model.model.layers[1].mixer.experts.up_proj.shape == (8, 32, 64)
    check_logits_generation_and_merged(hf, model, 30, tmp_path)


def test_moe_lora_equals_peft_and_adapts_the_routed_experts_by_default(moe_folder, tmp_path):
    """PEFT maps no MLP names to experts on this family: the names adapt attention, the shared experts and the Mamba
    in_proj, and without target_modules the routed experts come as target_parameters (up_proj, down_proj)."""
    model, _ = FastLanguageModel.from_pretrained(str(moe_folder[1]), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["mixer.experts.down_proj", "mixer.experts.up_proj"]
    mine, theirs = moe_adapter_grads("nemotron_h_moe", ours, tmp_path)
    assert mine.keys() == theirs.keys()
    assert any(".mixer.experts.lora_A" in n for n in mine) and any(".shared_experts.up_proj." in n for n in mine)
    assert_grads_close(mine, theirs)


def test_moe_recompute_gives_the_same_gradients(moe_folder):
    check_recompute_gradients(moe_folder[1])


def test_moe_loads_in_4bit_and_trains(moe_folder):
    """QLoRA: the ungated expert stacks load as NF4 (the router fp32), LoRA on them and the rest trains."""
    pytest.importorskip("bitsandbytes")
    from tiny import lora_losses

    from fasttune.quant.experts import QuantExpertWeight

    model, _ = FastLanguageModel.from_pretrained(str(moe_folder[1]), load_in_4bit=True)
    moe = model.model.layers[1].mixer
    assert isinstance(moe.experts.up_proj, QuantExpertWeight) and moe.gate.weight.dtype == torch.float32
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = lora_losses(model, ids, steps=4)
    assert losses[-1] < losses[0]


def test_moe_gguf_logits_match_llama_cpp(tmp_path):
    """Nemotron 3's layout in llama.cpp's nemotron_h_moe: the ungated expert stacks as ffn_up_exps / ffn_down_exps,
    the router and its bias (F32), the shared experts as *_shexp; LoRA merged into every linear layer it may adapt."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf("nemotron_h_moe", tmp_path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "nemotron_h_moe"
    assert field("nemotron_h_moe.feed_forward_length") == [0, 32, 0, 32, 0]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.exp_probs_b.bias"] == "F32"
    assert {"blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight", "blk.1.ffn_up_shexp.weight"} <= set(types)
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS)
    assert rel < 2e-3 and top1 >= 1.0, (rel, top1)


@pytest.mark.parametrize("attention, mlp, expected", [
    (True, True, ["down_proj", "in_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (False, True, ["down_proj", "up_proj"]),  # (no gate_proj in the ungated MLPs, and no warning about it)
    (True, False, ["in_proj", "k_proj", "o_proj", "q_proj", "v_proj"]),
])
def test_fastmodel_switches(folder, attention, mlp, expected):
    from fasttune import FastModel

    model, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the switches pick the names; nothing to warn about)
        lora = FastModel.get_peft_model(model, r=4, finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    assert sorted(lora.lora_settings.target_modules) == expected


def test_latent_experts_gguf_logits_match_llama_cpp(tmp_path):
    """Nemotron 3 Super's latent projections in llama.cpp's nemotron_h_moe: fc1 / fc2_latent_proj as ffn_latent_down
    / ffn_latent_up, the experts latent-wide, moe_latent_size in the metadata; LoRA merged into every linear layer."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf("nemotron_h_moe", tmp_path, moe_latent_size=16)
    assert reader.fields["nemotron_h_moe.moe_latent_size"].contents() == 16
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.1.ffn_latent_down.weight"] == [64, 16] and shapes["blk.1.ffn_latent_up.weight"] == [16, 64]
    assert shapes["blk.1.ffn_up_exps.weight"] == [16, 32, 8]
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS)
    assert rel < 2e-3 and top1 >= 1.0, (rel, top1)
