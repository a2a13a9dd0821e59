"""Qwen3.5's text model: its config fields, packed documents in the gated DeltaNet layers, 4-bit loading.
(Logits, LoRA gradients, generation and merged checkpoints against transformers run with every family: tiny.py.)"""
import pytest
import torch
from tiny import hf_config, lora_losses

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.models.config import ModelConfig


def test_layer_types_and_fields():
    arch = ModelConfig.from_hf(hf_config("qwen3_5_text"))
    assert arch.linear_layers == [True, True, True, False]
    assert (arch.linear_key_heads, arch.linear_value_heads, arch.linear_key_dim, arch.linear_value_dim) == (2, 4, 16, 16)
    assert arch.attn_output_gate and arch.qk_norm and arch.norm_offset == 1.0 and arch.rotary_dim == 4
    # without layer_types: every full_attention_interval-th layer attends (transformers' default)
    cfg = hf_config("qwen3_5_text").to_dict()
    cfg.pop("layer_types")
    cfg.update(full_attention_interval=2)
    assert ModelConfig.from_hf(cfg).linear_layers == [True, False, True, False]


def test_unknown_layer_type_is_refused():
    cfg = hf_config("qwen3_5_text").to_dict()
    cfg["layer_types"] = ["linear_attention", "mamba", "linear_attention", "full_attention"]
    with pytest.raises(ModelLoadError, match="layer_types.*'linear_attention' or 'full_attention'"):
        ModelConfig.from_hf(cfg)


def test_packed_documents_equal_each_document_alone(tiny_model_dir):
    """Two documents in one row (positions restarting at 0, as padding-free collators write them): each one's
    logits equal the document run alone, so neither the conv nor the delta-rule state carries across."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_text")), dtype=torch.float32)
    model.eval()
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(17), torch.arange(13)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        first = model(ids[:, :17]).logits
        second = model(ids[:, 17:]).logits
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        joined = model(ids).logits
    assert not torch.allclose(joined[:, 17:], second, atol=1e-3)  # without the restart the second sees the first


def test_loads_in_4bit_and_trains(tiny_model_dir):
    """QLoRA: the linear-attention projections load in NF4 like the others and LoRA on them trains."""
    pytest.importorskip("bitsandbytes")
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_text")), load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["in_proj_qkv", "in_proj_z", "out_proj",
                                                                           "q_proj", "down_proj"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("linear_attn.in_proj_qkv" in n for n in names) and any("self_attn.q_proj" in n for n in names)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = lora_losses(model, ids, steps=4)
    assert losses[-1] < losses[0]


def test_lora_on_the_linear_attention_equals_peft(tiny_model_dir, tmp_path):
    """LoRA on every projection of the DeltaNet layers (the fused in_proj group and out_proj): gradients equal
    PEFT's on transformers' model, left padding included (zeroed pads, as transformers does)."""
    from peft_oracle import peft_grads, peft_twin, randomize_lora_b

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_text")), dtype=torch.float32)
    targets = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj", "o_proj"]
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=targets,
                                            use_gradient_checkpointing=False)
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin("qwen3_5_text", tmp_path / "adapter")
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 6] = -100  # predicted from a padding position, whose output means nothing in either model
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = peft_grads(ref)
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(mine) == len(theirs) == 2 * (3 * 5 + 2)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + 5e-6 * theirs[n].abs().max().item(), msg=n)


def test_default_targets_adapt_every_token_mixer(tiny_model_dir, qwen3_5_vl_dir):
    """Without target_modules, LoRA goes on the DeltaNet projections too (not only on the one attention layer);
    FastModel's attention switch does the same on the vision-language model, and leaves them out when off."""
    from fasttune import FastModel, FastVisionModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_text")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(3):
        assert {f"model.layers.{i}.linear_attn.{m}" for m in ("in_proj_qkv", "in_proj_z", "out_proj")} <= adapted
    assert "model.layers.3.self_attn.q_proj" in adapted and "model.layers.0.linear_attn.in_proj_a" not in adapted
    vlm, _ = FastVisionModel.from_pretrained(str(qwen3_5_vl_dir), dtype=torch.float32)
    on = FastModel.get_peft_model(vlm, r=4, finetune_vision_layers=False)
    names = {n for n, p in on.named_parameters() if p.requires_grad}
    assert any(".linear_attn.in_proj_qkv.lora_A" in n for n in names)
    vlm, _ = FastVisionModel.from_pretrained(str(qwen3_5_vl_dir), dtype=torch.float32)
    off = FastModel.get_peft_model(vlm, r=4, finetune_vision_layers=False, finetune_attention_modules=False)
    assert not any(".linear_attn." in n for n, p in off.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ Qwen3.5-MoE

def test_moe_logits_generation_and_merged_equal_transformers(tiny_model_dir, tmp_path):
    """Qwen3.5-MoE (4 experts, top 2, a gated shared expert in every layer): logits equal transformers' (left padding
    too), greedy generation too, and a merged checkpoint after LoRA loads in transformers with our logits."""
    from peft_oracle import check_logits_generation_and_merged
    from tiny import hf_model

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_moe_text")), dtype=torch.float32)
    assert model.arch.shared_expert_size == 48 and all(model.arch.moe_layers)
    check_logits_generation_and_merged(hf_model("qwen3_5_moe_text"), model, 30, tmp_path)


def test_moe_lora_equals_peft_and_adapts_the_routed_experts_by_default(tiny_model_dir, tmp_path):
    """Without targets: attention, DeltaNet and shared-expert layers by name and the routed experts as
    target_parameters; PEFT builds the same adapter from the saved config (it maps no MLP names on Qwen3.5-MoE) and
    its gradients equal ours."""
    from peft_oracle import moe_adapter_grads

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_5_moe_text")), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("qwen3_5_moe_text", ours, tmp_path)
    assert mine.keys() == theirs.keys()
    assert any("shared_expert.gate_proj" in n for n in mine) and any(".mlp.experts.lora_A" in n for n in mine)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + 5e-6 * theirs[n].abs().max().item(), msg=n)


def test_moe_vision_switches_adapt_the_shared_and_routed_experts(qwen3_5_moe_vl_dir):
    """FastModel's language MLP switch on Qwen3.5-MoE: the shared expert's layers by name, the routed experts as
    target_parameters; off, neither."""
    from fasttune import FastModel, FastVisionModel

    vlm, _ = FastVisionModel.from_pretrained(str(qwen3_5_moe_vl_dir), dtype=torch.float32)
    on = FastModel.get_peft_model(vlm, r=4, finetune_vision_layers=False)
    names = {n for n, p in on.named_parameters() if p.requires_grad}
    assert any(".mlp.shared_expert.down_proj.lora_A" in n for n in names)
    assert sorted(on.lora_settings.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    vlm, _ = FastVisionModel.from_pretrained(str(qwen3_5_moe_vl_dir), dtype=torch.float32)
    off = FastModel.get_peft_model(vlm, r=4, finetune_vision_layers=False, finetune_mlp_modules=False)
    assert not any(".mlp." in n for n, p in off.named_parameters() if p.requires_grad)


def test_multi_token_prediction_head_is_skipped_with_one_warning(tiny_model_dir):
    """A release's mtp.* tensors (hundreds on MoE models) give one warning, other unknown tensors one more naming a
    few; the model equals the one loaded without them."""
    import warnings

    from safetensors.torch import load_file, save_file

    folder = tiny_model_dir("qwen3_5_text")
    plain, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    weights = load_file(folder / "model.safetensors")
    extra = {f"mtp.layers.0.mlp.experts.{e}.{p}.weight": torch.ones(4, 4) for e in range(40)
             for p in ("gate_proj", "up_proj", "down_proj")}
    extra.update({"mtp.fc.weight": torch.ones(4, 8), **{f"model.extra_{i}.weight": torch.ones(2) for i in range(7)}})
    save_file({**weights, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    texts = [str(w.message) for w in caught if "mtp" in str(w.message) or "unexpected" in str(w.message)]
    assert len(texts) == 2, texts
    assert "multi-token-prediction head (121 tensors, e.g. mtp." in texts[0] and "is not loaded" in texts[0]
    assert "ignoring 7 unexpected tensors" in texts[1] and "and 2 more" in texts[1]
    ids = torch.randint(3, 200, (1, 12))
    assert torch.equal(model(ids).logits, plain(ids).logits)
