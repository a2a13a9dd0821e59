"""LFM2 (LiquidAI's LFM2 / LFM2.5 layout) on our decoder: gated short-convolution layers beside attention layers with
q/k norms, under transformers' names (conv.in_proj / conv.conv / conv.out_proj, self_attn.out_proj, feed_forward.w1
/ w3 / w2, operator_norm / ffn_norm, embedding_norm). The family tests (tests/tiny.py's FAMILIES) cover logits,
LoRA gradients against PEFT, generation, merging and GGUF in llama.cpp; here what is LFM2's own."""
import pytest
import torch
from peft_oracle import check_logits_generation_and_merged, check_recompute_gradients
from tiny import hf_config, hf_model

from fasttune import FastLanguageModel, FastModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.config import ModelConfig

# config.json as LiquidAI's LFM2-1.2B ships it (sizes shrunk): the original key names Lfm2Config translates
ORIGINAL = dict(model_type="lfm2", vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, block_ff_dim=192, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0,
                block_multiple_of=64, conv_L_cache=3, conv_bias=False, full_attn_idxs=[2], norm_eps=1e-5,
                tie_embedding=True, max_position_embeddings=256)


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):
    """transformers' LFM2 with conv biases (the releases have none; the GGUF family test covers that) and ours."""
    hf = hf_model("lfm2", conv_bias=True)
    with torch.no_grad():  # biases away from zero so a dropped one shows
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    return hf, model


def test_fields_from_the_original_config_json():
    arch = ModelConfig.from_hf(ORIGINAL)
    assert arch.linear_layers == [True, True, False, True] and arch.linear_kind == "short_conv"
    # Lfm2MLP: int(2 * 192 / 3) = 128, times 1.0, rounded up to a multiple of 64
    assert arch.intermediate_size == 128 and arch.tie_embeddings and arch.rms_norm_eps == 1e-5
    assert arch.linear_conv_kernel == 3 and arch.qk_norm and arch.rope_theta == 1e6  # Lfm2Config's default_theta
    assert ModelConfig.from_hf({**ORIGINAL, "block_ff_dim": 200}).intermediate_size == 192  # int(133.3) -> 192
    assert ModelConfig.from_hf({**ORIGINAL, "block_auto_adjust_ff_dim": False}).intermediate_size == 192
    hf = ModelConfig.from_hf(hf_config("lfm2"))
    assert hf.intermediate_size == 128 and hf.linear_layers == [True, True, False, True]


def test_unknown_layer_type_is_a_load_error():
    with pytest.raises(ModelLoadError, match=r"one of \['conv', 'full_attention'\].*sliding_attention"):
        ModelConfig.from_hf({**ORIGINAL, "layer_types": ["conv", "sliding_attention", "full_attention", "conv"]})


def test_logits_generation_and_merged_equal_transformers_with_conv_biases(pair, tmp_path):
    check_logits_generation_and_merged(*pair, 20, tmp_path)


def test_packed_documents_do_not_share_a_convolution(pair):
    """Two documents packed in one row (positions restarting at 0) give each document's logits alone: the
    convolution starts every document from a zero history, as the attention layer attends within it."""
    _, model = pair
    ids = torch.randint(3, 300, (1, 13), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([list(range(6)) + list(range(7))])
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        first, second = model(ids[:, :6]).logits, model(ids[:, 6:]).logits
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)
    assert (packed[:, 6:] - model(ids).logits[:, 6:]).abs().max() > 1e-3  # unpacked, the second one differs


def test_recompute_gives_the_same_gradients(pair, tmp_path):
    check_recompute_gradients(tmp_path / "m")


def test_default_targets_and_layer_switches_use_lfm2_names(pair):
    _, model = pair
    lora = FastLanguageModel.get_peft_model(model, r=4)
    assert sorted(lora.lora_settings.target_modules) == ["in_proj", "k_proj", "out_proj", "q_proj", "v_proj",
                                                         "w1", "w2", "w3"]
    adapted = {n.split(".lora_")[0] for n, p in lora.named_parameters() if p.requires_grad}
    assert "model.layers.0.conv.in_proj" in adapted and "model.layers.2.self_attn.out_proj" in adapted
    assert "model.layers.3.feed_forward.w2" in adapted and len(adapted) == 3 * 5 + 7


@pytest.mark.parametrize("attention,mlp,expected", [
    (True, False, ["in_proj", "k_proj", "out_proj", "q_proj", "v_proj"]),
    (False, True, ["w1", "w2", "w3"]),
])
def test_fastmodel_switches(tmp_path, tiny_tokenizer, attention, mlp, expected):
    hf_model("lfm2").save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = FastModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    lora = FastModel.get_peft_model(model, r=4, finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    assert sorted(lora.lora_settings.target_modules) == expected


def test_gguf_refuses_conv_biases(pair, tmp_path, tiny_tokenizer):
    _, model = pair
    with pytest.raises(ConfigError, match="conv_bias"):
        model.save_pretrained_gguf(tmp_path / "out.gguf", tiny_tokenizer, quantization_method="f16",
                                   progress=False)
    assert not list(tmp_path.glob("out*"))


def test_gguf_loads_back_with_the_same_logits(tmp_path):
    """llama.cpp's lfm2 file read back: the conv layers found from the 0 key/value heads, the MLP width as written."""
    from bpe_tokenizers import make_bpe_tokenizer

    hf_model("lfm2", vocab_size=416).save_pretrained(tmp_path / "m")
    bpe = make_bpe_tokenizer("gpt2")
    bpe.save_pretrained(tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    path = model.save_pretrained_gguf(tmp_path / "m.f32.gguf", tok, quantization_method="f32", progress=False)
    back, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32)
    assert back.arch.linear_layers == [True, True, False, True] and back.arch.intermediate_size == 128
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
