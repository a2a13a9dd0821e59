"""GLM-4.5 / 4.6 / 4.7 (transformers' Glm4MoeForCausalLM) on our decoder: DeepSeek-V3's sigmoid routing with a score
correction bias and expert groups, shared experts without a gate, dense layers first; Llama attention with q/k/v
biases, optional q/k norms and half (rotate-half) RoPE. Against transformers and PEFT on tests/tiny.py's model
(3 layers, layer 0 dense; 8 experts in 2 groups, top-2; routed_scaling_factor 2.5) and llama.cpp's glm4moe."""
import pytest
import torch
from peft_oracle import assert_grads_close, assert_same_routing, check_logits_generation_and_merged, moe_adapter_grads
from tiny import hf_config, hf_model, saved_pair

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.models.config import ModelConfig
from fasttune.models.moe import route_sigmoid


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):
    return saved_pair("glm4_moe", tmp_path / "m", tiny_tokenizer)


def test_fields():
    arch = ModelConfig.from_hf(hf_config("glm4_moe"))
    assert arch.moe_layers == [False, True, True] and arch.num_experts == 8 and arch.shared_expert_size == 32
    assert arch.router_scoring == "sigmoid" and arch.router_groups == (2, 1) and arch.routed_scaling == 2.5
    assert arch.rotary_dim == 8 and arch.attn_bias and not arch.o_bias and arch.qk_norm
    assert not arch.shared_expert_gated and not arch.rope_interleaved  # (GLM-4's dense model pairs adjacently)
    with pytest.raises(ModelLoadError, match="n_group 3 / topk_group 1"):
        ModelConfig.from_hf(hf_config("glm4_moe", n_group=3))


@pytest.mark.parametrize("groups", [(1, 1), (2, 1), (4, 2)])
def test_routing_equals_transformers_router(groups):
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    router = Glm4MoeTopkRouter(hf_config("glm4_moe", n_group=groups[0], topk_group=groups[1]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.3)
    x = torch.randn(50, 64, generator=g)
    logits, want_w, want_e = router(x)
    got_w, got_e = route_sigmoid(logits, router.e_score_correction_bias, 2, groups, True, 2.5)
    assert_same_routing(want_w, want_e, got_w, got_e)


def test_logits_generation_and_merged_equal_transformers(pair, tmp_path):
    check_logits_generation_and_merged(*pair, 20, tmp_path)


def test_router_stays_fp32_in_a_bf16_model(tmp_path, tiny_tokenizer):
    hf_model("glm4_moe").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_lora_equals_peft_on_the_routed_experts(pair, tmp_path):
    """PEFT maps GLM-4.5 as Qwen2-MoE: the MLP names mean the routed experts (gate + up as one rank-2r LoRA), so the
    shared experts and the dense layer 0 stay frozen; PEFT builds the same adapter and its gradients equal ours."""
    _, model = pair
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("glm4_moe", ours, tmp_path)
    assert mine.keys() == theirs.keys()
    assert any(".mlp.experts.lora_A" in n for n in mine) and any(".self_attn.o_proj.lora_A" in n for n in mine)
    assert not any("shared_experts." in n or "layers.0.mlp." in n for n in mine)
    assert_grads_close(mine, theirs)


def test_mtp_layer_is_one_warning(tmp_path, tiny_tokenizer):
    """GLM-4.5 checkpoints store the multi-token-prediction layer as model.layers.<num_hidden_layers>; like
    transformers we do not load it, with one warning."""
    from safetensors.torch import load_file, save_file

    hf_model("glm4_moe").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    extra = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in tensors.items() if "layers.2." in k}
    save_file({**tensors, **extra}, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    config = (tmp_path / "m" / "config.json").read_text().replace('"num_nextn_predict_layers": 0',
                                                                   '"num_nextn_predict_layers": 1')
    (tmp_path / "m" / "config.json").write_text(config)
    with pytest.warns(UserWarning, match=r"multi-token-prediction head \(\d+ tensors, e.g. model.layers.3."):
        FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)


def test_gguf_logits_equal_llama_cpp(tmp_path):
    """llama.cpp's glm4moe (sigmoid gating, exp_probs_b, expert groups, shared experts, a leading dense layer): f16
    logits of the LoRA-merged model within the family test's bound; the router and its bias in F32."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf("glm4_moe", tmp_path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "glm4moe" and field("glm4moe.leading_dense_block_count") == 1
    assert field("glm4moe.expert_weights_scale") == 2.5 and field("glm4moe.expert_shared_count") == 1
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.exp_probs_b.bias"] == "F32"
    assert "blk.0.ffn_gate.weight" in types and "blk.0.ffn_gate_inp.weight" not in types
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS)
    assert rel < 2e-3 and top1 >= 1.0
