"""ERNIE 4.5 MoE (transformers' Ernie4_5_MoeForCausalLM: ERNIE-4.5-21B-A3B, -300B-A47B) on our decoder: ERNIE 4.5's
attention (adjacent-pair RoPE), a dense first layer, then experts chosen by softmax probability + a correction bias
(moe_statics), weighted by their probabilities over max(sum, moe_norm_min), beside shared experts. Against
transformers and PEFT on tests/tiny.py's model (3 layers, layer 0 dense; 8 experts, top 2; 2 shared)."""
import pytest
import torch
from peft_oracle import (assert_grads_close, assert_same_routing, check_logits_generation_and_merged,
                         check_recompute_gradients, moe_adapter_grads)
from tiny import hf_config, hf_model, saved_pair

from fasttune import FastLanguageModel
from fasttune.models.config import ModelConfig
from fasttune.models.moe import route_softmax_bias

# config.json as Baidu's ERNIE-4.5-21B-A3B-PT ships it (sizes shrunk): the original MoE key names
ORIGINAL = dict(model_type="ernie4_5_moe", vocab_size=300, hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=8,
                moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=2, moe_layer_start_index=1,
                moe_layer_end_index=-1, moe_layer_interval=1, moe_norm_min=1e-12, use_bias=False,
                tie_word_embeddings=True, rms_norm_eps=1e-5)


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):
    return saved_pair("ernie4_5_moe", tmp_path / "m", tiny_tokenizer)


def test_fields_from_the_original_config_json():
    arch = ModelConfig.from_hf(ORIGINAL)
    assert arch.moe_layers == [False, True, True, True] and arch.num_experts == 8 and arch.num_experts_per_tok == 2
    assert arch.shared_expert_size == 64 and not arch.shared_expert_gated and arch.router_scoring == "softmax_bias"
    assert arch.rope_interleaved and arch.rope_theta == 500000.0 and arch.tie_embeddings
    every_other = ModelConfig.from_hf({**ORIGINAL, "moe_layer_interval": 2, "moe_layer_end_index": 2})
    assert every_other.moe_layers == [False, True, False, False]  # ((i + 1) % 2 == 0 within [1, 2])
    assert ModelConfig.from_hf(hf_config("ernie4_5_moe")).moe_layers == [False, True, True]


@pytest.mark.parametrize("norm_min", [1e-12, 0.9])  # (0.9: the clamp decides for most tokens)
def test_routing_equals_transformers_router(norm_min):
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    router = Ernie4_5_MoeTopKRouter(hf_config("ernie4_5_moe", moe_norm_min=norm_min))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.moe_statics.e_score_correction_bias.copy_(torch.randn(1, 8, generator=g) * 0.3)
    x = torch.randn(50, 64, generator=g)
    logits, want_w, want_e = router(x)
    got_w, got_e = route_softmax_bias(logits, router.moe_statics.e_score_correction_bias, 2, norm_min)
    assert_same_routing(want_w, want_e, got_w, got_e)


def test_logits_generation_and_merged_equal_transformers(pair, tmp_path):
    check_logits_generation_and_merged(*pair, 20, tmp_path)


def test_router_and_its_bias_stay_fp32_in_a_bf16_model(tmp_path, tiny_tokenizer):
    hf_model("ernie4_5_moe").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.moe_statics.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_lora_equals_peft_on_the_routed_experts(pair, tmp_path):
    """PEFT maps ERNIE 4.5 MoE as Qwen2-MoE: the MLP names mean the routed experts (gate + up as one rank-2r LoRA), so
    the shared experts and the dense layer 0 stay frozen; PEFT builds the same adapter and its gradients equal ours."""
    _, model = pair
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("ernie4_5_moe", ours, tmp_path)
    assert mine.keys() == theirs.keys()
    assert any(".mlp.experts.lora_A" in n for n in mine) and any(".self_attn.o_proj.lora_A" in n for n in mine)
    assert not any("shared_experts." in n or "layers.0.mlp." in n for n in mine)
    assert_grads_close(mine, theirs)


def test_recompute_gives_the_same_gradients(pair, tmp_path):
    check_recompute_gradients(tmp_path / "m")


def test_gguf_logits_equal_llama_cpp(tmp_path):
    """llama.cpp's ernie4_5-moe (softmax gating with exp_probs_b, shared experts, a leading dense layer, an MoE step):
    f16 logits of the LoRA-merged model within the family test's bound; the router and its bias in F32."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf("ernie4_5_moe", tmp_path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "ernie4_5-moe" and field("ernie4_5-moe.leading_dense_block_count") == 1
    assert field("ernie4_5-moe.interleave_moe_layer_step") == 1 and field("ernie4_5-moe.expert_shared_count") == 2
    assert field("ernie4_5-moe.expert_shared_feed_forward_length") == 64
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.exp_probs_b.bias"] == "F32"
    assert "blk.0.ffn_gate.weight" in types and "blk.0.ffn_gate_inp.weight" not in types
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS)
    assert rel < 2e-3 and top1 >= 1.0, (rel, top1)


def test_gguf_refuses_moe_layers_llama_cpp_does_not_place(tmp_path):
    from fasttune.errors import ConfigError

    from bpe_tokenizers import make_bpe_tokenizer

    hf_model("ernie4_5_moe", moe_layer_end_index=2, num_hidden_layers=4, vocab_size=416).save_pretrained(tmp_path / "m")
    make_bpe_tokenizer("gpt2").save_pretrained(tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"))
    assert model.arch.moe_layers == [False, True, True, False]  # (no first / step rule gives this)
    with pytest.raises(ConfigError, match="llama.cpp's rule"):
        model.save_pretrained_gguf(tmp_path / "m.gguf", tok, quantization_method="f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_loads_in_4bit_and_trains(pair, tmp_path):
    """QLoRA: attention, the dense and shared MLPs and the stacked experts load in NF4 (the router stays fp32), and
    LoRA on attention and the experts trains."""
    pytest.importorskip("bitsandbytes")
    from tiny import lora_losses

    from fasttune.peft.lora_layer import is_quantized
    from fasttune.quant.experts import QuantExpertWeight

    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), load_in_4bit=True)
    mlp = model.model.layers[1].mlp
    assert is_quantized(model.model.layers[1].self_attn.q_proj) and is_quantized(mlp.shared_experts.up_proj)
    assert isinstance(mlp.experts.gate_up_proj, QuantExpertWeight) and mlp.gate.weight.dtype == torch.float32
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = lora_losses(model, ids, steps=4)
    assert losses[-1] < losses[0]
