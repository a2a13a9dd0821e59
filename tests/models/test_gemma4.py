"""Gemma 4 E2B / E4B's layout on our decoder (models/gemma4.py): per-layer embeddings and the layers that reuse an
earlier layer's keys and values (with twice-as-wide MLPs), against transformers + PEFT on a tiny 4-layer model. The
31B layout (per-layer head sizes, values from the keys) is a tests/tiny.py family; the released checkpoints are
test_gemma4_vlm.py's."""
import pytest
import torch
from peft_oracle import (check_logits_generation_and_merged, check_recompute_gradients, moe_adapter_grads,
                         peft_grads, peft_twin, randomize_lora_b)
from tiny import hf_config, hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.config import ModelConfig


@pytest.fixture(scope="module")
def e2b_dir(tmp_path_factory, tiny_tokenizer):
    return save_hf(hf_model("gemma4_e2b"), tmp_path_factory.mktemp("e2b") / "m", tiny_tokenizer)


def test_fields_and_refusals():
    arch = ModelConfig.from_hf(hf_config("gemma4_e2b"))
    assert arch.per_layer_input_size == 8 and arch.double_wide_mlp and arch.kv_shared_layers == 2
    assert [arch.kv_source(i) for i in range(4)] == [None, None, 0, 1]
    assert [arch.kv_stored(i) for i in range(4)] == [True, True, False, False]
    bad = {**hf_config("gemma4_e2b").to_dict(), "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2}
    with pytest.raises(ModelLoadError, match="num_kv_shared_layers"):
        ModelConfig.from_hf(bad)
    with pytest.raises(ModelLoadError, match="mixture-of-experts"):
        ModelConfig.from_hf({**hf_config("gemma4_e2b").to_dict(), "enable_moe_block": True})


def test_logits_generation_and_merged_equal_transformers(e2b_dir, tmp_path):
    """Logits with and without left padding, greedy generation through the cache (the shared layers read layers 0
    and 1's), and a merged checkpoint transformers loads."""
    model, _ = FastLanguageModel.from_pretrained(str(e2b_dir), dtype=torch.float32)
    assert model.model.layers[2].mlp.intermediate == 256 and not hasattr(model.model.layers[2].self_attn, "k_proj")
    check_logits_generation_and_merged(hf_model("gemma4_e2b"), model, 12, tmp_path)


def test_lora_gradients_equal_peft(e2b_dir, tmp_path):
    """Gradients reach layers 0 and 1's k_proj / v_proj through the shared layers' attention too."""
    model, _ = FastLanguageModel.from_pretrained(str(e2b_dir), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    ref = peft_twin("gemma4_e2b", tmp_path / "adapter")
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    theirs = peft_grads(ref)
    mine = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and len(mine) == 2 * (2 * 7 + 2 * 5)  # shared layers: no k_proj / v_proj
    for n, g in mine.items():  # fp32 sums in another order: up to ~1e-5 of a tensor's largest entry here
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + 3e-5 * theirs[n].abs().max().item(), msg=n)


def test_recompute_and_offload_give_the_same_gradients(e2b_dir):
    """The shared keys and values and the per-layer inputs cross layer boundaries: each recompute takes them as
    inputs and hands their gradients back."""
    check_recompute_gradients(e2b_dir)


def test_inputs_embeds_are_refused(e2b_dir):
    model, _ = FastLanguageModel.from_pretrained(str(e2b_dir), dtype=torch.float32)
    with pytest.raises(ConfigError, match="per-layer embeddings.*input_ids"):
        model(inputs_embeds=torch.zeros(1, 4, 64))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_tokenizer):
    return save_hf(hf_model("gemma4_moe"), tmp_path_factory.mktemp("moe") / "m", tiny_tokenizer)


def test_moe_logits_generation_and_merged_equal_transformers(moe_dir, tmp_path):
    """26B-A4B's layout: experts beside each dense MLP, routed on the residual stream with the router's own norm,
    scale and per-expert scales."""
    model, _ = FastLanguageModel.from_pretrained(str(moe_dir), dtype=torch.float32)
    assert model.arch.moe_block == "gemma4" and model.arch.num_experts == 4 and not any(model.arch.moe_layers)
    check_logits_generation_and_merged(hf_model("gemma4_moe"), model, 12, tmp_path)


def test_moe_lora_on_experts_and_dense_mlp_equals_peft(moe_dir, tmp_path):
    """The default targets: the seven projections (the MLP names are the dense MLP's) and the stacked experts as
    target_parameters (experts.gate_up_proj, experts.down_proj), as PEFT adapts them."""
    model, _ = FastLanguageModel.from_pretrained(str(moe_dir), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert sorted(model.lora_settings.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("gemma4_moe", model, tmp_path)
    assert any("experts" in n for n in mine) and any("mlp.down_proj" in n for n in mine)
    assert mine.keys() == theirs.keys()
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + 3e-5 * theirs[n].abs().max().item(), msg=n)


def test_moe_recompute_gradients(moe_dir):
    check_recompute_gradients(moe_dir)


def test_norms_round_as_gemma4_rmsnorm_in_bf16():
    """Gemma4RMSNorm applies its weight in fp32 and then casts (Llama's casts first): bit for bit in bf16, where
    the other order differs."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    from fasttune.models.decoder import RMSNorm

    torch.manual_seed(0)
    x = torch.randn(4, 7, 96).bfloat16()
    ref = Gemma4RMSNorm(96, eps=1e-6)
    ours = RMSNorm(96, 1e-6, 0.0, fp32_scale=True)
    llama_order = RMSNorm(96, 1e-6, 0.0)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.3)
        ours.weight.copy_(ref.weight)
        llama_order.weight.copy_(ref.weight)
        ref, ours, llama_order = ref.bfloat16(), ours.bfloat16(), llama_order.bfloat16()
        assert torch.equal(ours(x), ref(x)) and not torch.equal(llama_order(x), ref(x))


def test_prefill_runs_the_shared_layers_on_the_last_position_only(e2b_dir):
    """They write no cache, so generation's prefill (logits of the last position only) gives them one position, as
    transformers does; the tokens equal transformers' (left-padded rows included) and a full forward's logits."""
    model, _ = FastLanguageModel.from_pretrained(str(e2b_dir), dtype=torch.float32)
    hf = hf_model("gemma4_e2b")
    seen = []
    model.model.layers[2].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    model.model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(-args[0].shape[1]))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert seen[:2] == [-9, 1]  # prefill: layer 1 over the prompt, shared layer 2 over its last position


def test_twelve_layers_with_transformers_default_layer_types(tmp_path, tiny_tokenizer):
    """A model of 10 layers or more, as every release is: transformers keys its per-layer overrides (the full layers'
    head size and key/value heads) as zero-padded text ("05"); the full layers must get them (a missed override
    builds 16-channel heads where the checkpoint has 32: a shape error on load). Logits equal transformers'."""
    import transformers

    from tiny import TINY

    cfg = transformers.Gemma4TextConfig(**{**TINY, "num_hidden_layers": 12}, head_dim=16, global_head_dim=32,
                                        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4,
                                        hidden_size_per_layer_input=0)
    assert cfg.layer_types[5] == "full_attention"
    arch = ModelConfig.from_hf(cfg)
    assert arch.layer_config(5).head_dim == 32 and arch.layer_config(5).num_kv_heads == 1
    torch.manual_seed(0)
    hf = transformers.Gemma4ForCausalLM(cfg).eval()
    save_hf(hf, tmp_path / "m", tiny_tokenizer)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
