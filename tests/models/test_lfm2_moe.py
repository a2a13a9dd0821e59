"""LFM2-MoE (transformers' Lfm2MoeForCausalLM: LFM2-8B-A1B) on our decoder: LFM2's short-convolution and attention
layers with dense feed-forwards first, then routed experts (sigmoid scores, chosen by score + the block's
expert_bias, renormalised + 1e-6, scaled). Against transformers and PEFT on tests/tiny.py's model (4 layers, the
first dense, 8 experts of 32, top 2)."""
import pytest
import torch
from peft_oracle import (assert_grads_close, check_logits_generation_and_merged, check_recompute_gradients,
                         moe_adapter_grads)
from tiny import hf_config, hf_model, saved_pair

from fasttune import FastLanguageModel
from fasttune.models.config import ModelConfig


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):
    return saved_pair("lfm2_moe", tmp_path / "m", tiny_tokenizer)


def test_fields():
    arch = ModelConfig.from_hf(hf_config("lfm2_moe"))
    assert arch.moe_layers == [False, True, True, True] and arch.intermediate_size == 96
    assert arch.router_scoring == "sigmoid" and arch.score_bias == "block" and arch.router_renorm_eps == 1e-6
    assert arch.linear_layers == [True, False, True, True] and arch.routed_scaling == 1.5
    assert ModelConfig.from_hf(hf_config("lfm2_moe", use_expert_bias=False)).score_bias is None


def test_routing_equals_transformers_router():
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeTopKRouter

    from fasttune.models.moe import route_sigmoid

    cfg = hf_config("lfm2_moe", num_experts=16, num_experts_per_tok=3)
    router = Lfm2MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 0.3
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, want_w, want_e = router(x, bias)
    got_w, got_e = route_sigmoid(logits, bias, 3, (1, 1), True, 1.5, 1e-6)
    order_w, order_g = want_e.sort(dim=-1).indices, got_e.sort(dim=-1).indices
    assert torch.equal(want_e.gather(1, order_w), got_e.gather(1, order_g))
    torch.testing.assert_close(got_w.gather(1, order_g), want_w.gather(1, order_w), rtol=1e-6, atol=1e-7)


def test_logits_generation_and_merged_equal_transformers(pair, tmp_path):
    check_logits_generation_and_merged(*pair, 20, tmp_path)


def test_routing_without_the_expert_bias_equals_transformers(tmp_path, tiny_tokenizer):
    """use_expert_bias=False: experts chosen by score alone, no bias tensor in the checkpoint or the model."""
    hf, model = saved_pair("lfm2_moe", tmp_path / "m", tiny_tokenizer, use_expert_bias=False)
    assert not any("bias" in n for n, _ in model.named_buffers())
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_equals_peft_with_the_experts(pair, tmp_path):
    """The default targets: the attention and convolution projections, the dense layer's w1 / w3 / w2 (PEFT maps no
    MLP names to LFM2-MoE's experts: they name the dense feed-forward, as in PEFT) and the routed experts as
    target_parameters; PEFT builds the same adapter from the saved files and its gradients equal ours."""
    _, model = pair
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["feed_forward.experts.down_proj",
                                                    "feed_forward.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("lfm2_moe", ours, tmp_path)
    assert mine.keys() == theirs.keys()
    assert any(".feed_forward.experts." in n for n in mine) and any("layers.0.feed_forward.w1" in n for n in mine)
    assert_grads_close(mine, theirs)


def test_recompute_and_offload_gradients_equal(tmp_path, tiny_tokenizer):
    hf_model("lfm2_moe").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    check_recompute_gradients(tmp_path / "m")


@pytest.mark.parametrize("bias", [True, False], ids=["expert_bias", "no_bias"])
def test_gguf_logits_equal_llama_cpp(bias, tmp_path):
    """llama.cpp's lfm2moe: the convolution layers by 0 key/value heads, the dense layer first, the stacked experts
    split into ffn_gate_exps / ffn_up_exps, the router and its expert_bias (exp_probs_b), sigmoid gating: f16 logits of
    the LoRA-merged model (experts included) within the MoE families' bound (without an expert_bias: zeros, which
    llama.cpp requires). A scaled or unnormalised routing, which
    llama.cpp's lfm2moe does not compute (seen: 1e-2 of the logits' range at scale 1.5), is refused."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf("lfm2_moe", tmp_path, routed_scaling_factor=1.0, use_expert_bias=bias)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "lfm2moe" and field("lfm2moe.leading_dense_block_count") == 1
    assert field("lfm2moe.attention.head_count_kv") == [0, 2, 0, 0] and field("lfm2moe.expert_gating_func") == 2
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == [64, 32, 8] and shapes["blk.1.exp_probs_b.bias"] == [8]
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS)
    assert rel < 2e-3 and top1 >= 1.0


@pytest.mark.parametrize("overrides", [{}, {"routed_scaling_factor": 1.0, "norm_topk_prob": False}],
                         ids=["scaled", "unnormalised"])
def test_gguf_refuses_routing_llama_cpp_does_not_compute(overrides, tmp_path, tiny_tokenizer):
    from fasttune.errors import ConfigError

    hf_model("lfm2_moe", **overrides).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="llama.cpp's lfm2moe always renormalises and never scales"):
        model.save_pretrained_gguf(tmp_path / "out.gguf", tok, quantization_method="f16", progress=False)
    assert not (tmp_path / "out.gguf").exists()
