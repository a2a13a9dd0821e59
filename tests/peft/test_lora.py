"""LoRA: gradients equal PEFT's for the same weights; adapters round-trip through PEFT and from_pretrained."""
import pytest
import torch
from peft_oracle import peft_grads, peft_twin, randomize_lora_b
from tiny import FAMILIES, hf_config

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _lora_model(folder, **kw):
    model, _ = FastLanguageModel.from_pretrained(str(folder))
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_grads_equal_peft(family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)
    ours = _lora_model(folder)
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin(family, tmp_path / "adapter")
    ids, mask, labels = _batch()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = peft_grads(ref)
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    layers = hf_config(family).num_hidden_layers
    # fused qkv_proj / gate_up_proj count once; Arcee and Apertus have no gate_proj
    per_layer = {"phi3": 4, "glm4": 6, "arcee": 6, "apertus": 6}.get(family, 7)
    # Qwen3.5's 3 DeltaNet layers: MLP and the linear-attention projections (in_proj_qkv, in_proj_z, out_proj)
    # LFM2's 3 short-convolution layers: MLP (w1, w3, w2) and the convolution's in_proj and out_proj
    # Gemma 4's full layer takes its values from k_proj (attention_k_eq_v): no v_proj there
    # Granite 4.0-H's 3 Mamba-2 layers: the shared MLP (input_linear, output_linear) and the mixer's in_proj, out_proj
    expected = {"qwen3_5_text": 2 * (3 * 6 + 7), "lfm2": 2 * (3 * 5 + 7), "lfm3": 2 * (2 * 5 + 2 * 7),
                "gemma4_text": 2 * (7 + 6), "granitemoehybrid": 2 * (3 * 4 + 6),
                # Nemotron-H: 2 Mamba layers (in_proj: PEFT refuses out_proj there), 2 MLP layers (up, down), 1
                # attention layer (q/k/v/o)
                "nemotron_h": 2 * (2 * 1 + 2 * 2 + 4),
                # Bamba: 3 Mamba layers (in_proj, out_proj and the MLP's three), 1 attention layer (the seven)
                "bamba": 2 * (3 * 5 + 7),
                # Falcon-H1: every layer attention, the MLP and the Mamba in_proj (PEFT refuses out_proj there)
                "falcon_h1": 2 * 2 * 8}.get(
        family, 2 * layers * per_layer)
    assert len(mine) == len(theirs) and len(mine) == expected
    # fp32 sums in another order: noise ~1e-6 of the tensor's largest entry (~3e-6 through Qwen3.5's delta rule,
    # whose triangular solves and chunk scan run in another order than transformers', and through sliding-window
    # layers, whose banded blocks (models/window_attention.py) take other SDPA kernels than a dense mask: 2.6e-6
    # seen on Gemma 4; 2.1e-6 on LFM3's short-convolution in_proj, whose conv transformers runs as F.conv1d, on
    # one CPU and not another)
    noise = {"qwen3_5_text": 5e-6, "gemma4_text": 3e-6, "lfm2": 3e-6, "lfm3": 3e-6}.get(family, 1e-6)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7 + noise * theirs[n].abs().max().item(), msg=n)


def test_modules_to_save_and_rslora_grads_equal_peft(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    ours = _lora_model(folder, use_rslora=True, modules_to_save=["embed_tokens", "lm_head"],
                       target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin("llama", tmp_path / "adapter")
    assert ref.peft_config["default"].use_rslora
    ids, mask, labels = _batch()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = peft_grads(ref)
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(mine)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_adapter_round_trip_peft_logits(family, tiny_model_dir, tmp_path):
    """Tied families (qwen2/gemma) with modules_to_save get untied like PEFT does."""
    ours = _lora_model(tiny_model_dir(family), modules_to_save=["lm_head"])
    randomize_lora_b(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(0.01)
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin(family, tmp_path / "adapter").eval()
    ours.eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(input_ids=ids, attention_mask=mask).logits[mask.bool()], rtol=1e-5, atol=1e-5)


def test_from_pretrained_adapter_restores_trainable_set(tiny_model_dir, tmp_path):
    ours = _lora_model(tiny_model_dir("llama"), modules_to_save=["embed_tokens", "lm_head"])
    randomize_lora_b(ours)
    trainable = lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    with torch.no_grad():  # "trained" embedding copies, so the base's own rows would not pass for them
        for name, p in trainable(ours).items():
            if "lora" not in name:
                p.add_(0.01 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "adapter")
    again, tok = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"))
    # The same trainable tensors, by name and value (LoRA A/B and the embed_tokens/lm_head copies); the rest frozen.
    a, b = trainable(ours), trainable(again)
    assert tok is not None and sorted(b) == sorted(a)
    assert any("lora_B" in n for n in a) and any("embed_tokens" in n for n in a) and any("lm_head" in n for n in a)
    for name in a:
        assert torch.equal(b[name], a[name]), name
    assert again.lora_settings == ours.lora_settings
    ours.eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


def test_random_state_seeds_init(tiny_model_dir):
    folder = tiny_model_dir("llama")
    a = _lora_model(folder, random_state=1)
    b = _lora_model(folder, random_state=1)
    c = _lora_model(folder, random_state=2)
    qa, qb, qc = (m.model.layers[0].self_attn.q_proj.lora_A for m in (a, b, c))
    assert torch.equal(qa, qb) and not torch.equal(qa, qc)


def test_lora_dropout_only_in_training(tiny_model_dir):
    model = _lora_model(tiny_model_dir("llama"), lora_dropout=0.5)
    randomize_lora_b(model)
    ids, mask, _ = _batch()
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kw, match", [
    ({"r": 0}, "rank"), ({"lora_dropout": 1.5}, "lora_dropout"), ({"bias": "all"}, "bias"),
    ({"target_modules": ["nonexistent_proj"]}, "match no layer"), ({"modules_to_save": ["norm"]}, "modules_to_save"),
    ({"use_gradient_checkpointing": "sometimes"}, "use_gradient_checkpointing"),
])
def test_bad_lora_settings_are_clear_errors(kw, match, tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    with pytest.raises(ConfigError, match=match):
        FastLanguageModel.get_peft_model(model, **kw)


def test_adapter_on_wrong_base_is_refused(tiny_model_dir, tmp_path):
    from fasttune.errors import ModelLoadError
    from fasttune.peft.adapter_io import load_adapter_into

    ours = _lora_model(tiny_model_dir("llama"))
    ours.save_pretrained(tmp_path / "adapter")
    other, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama", intermediate_size=96)))
    with pytest.raises(ModelLoadError, match="shape"):
        load_adapter_into(other, tmp_path / "adapter")


def test_phi3_partial_fused_targets_warn_and_record_what_was_applied(tiny_model_dir, tmp_path):
    """Phi-3 fuses q/k/v into qkv_proj: PEFT refuses target_modules=["q_proj", "v_proj"]; we apply qkv_proj (so
    k_proj gets LoRA too), say so, and record both the asked and the applied names."""
    import json

    from peft import LoraConfig, get_peft_model
    from tiny import hf_model

    from fasttune.peft.lora import FusedTargetsWarning

    with pytest.raises(ValueError, match="q_proj"):  # the oracle: PEFT has no layer by these names
        get_peft_model(hf_model("phi3"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("phi3")))
    with pytest.warns(FusedTargetsWarning, match=r"\['q_proj', 'v_proj'\] were applied as 'qkv_proj', so k_proj"):
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    s = model.lora_settings
    assert s.target_modules == ["qkv_proj"] and s.requested_target_modules == ["q_proj", "v_proj"]
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["qkv_proj"]
    # The same layers as PEFT's own request for qkv_proj.
    twin = get_peft_model(hf_model("phi3"), LoraConfig(r=4, target_modules=["qkv_proj"]))
    theirs = sorted(n.replace("base_model.model.", "").replace(".default", "")
                    for n, p in twin.named_parameters() if p.requires_grad)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        n.replace(".weight", "") for n in theirs]


def test_glm4_fuses_only_gate_up(tiny_model_dir):
    """GLM-4 keeps q/k/v apart and fuses gate/up: only gate_proj moves (with the warning), q_proj stays itself."""
    from fasttune.peft.lora import FusedTargetsWarning

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("glm4")))
    with pytest.warns(FusedTargetsWarning, match=r"\['gate_proj'\] were applied as 'gate_up_proj', so up_proj"):
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "gate_proj"])
    assert model.lora_settings.target_modules == ["gate_up_proj", "q_proj"]


def test_phi3_whole_fused_groups_are_applied_without_a_warning(tiny_model_dir, recwarn):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("phi3")))
    model = FastLanguageModel.get_peft_model(model, r=4)  # the default q,k,v,o,gate,up,down
    assert not [w for w in recwarn if "fuses" in str(w.message)]
    assert model.lora_settings.target_modules == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert model.lora_settings.requested_target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_default_targets_skip_names_a_dense_model_lacks(tiny_model_dir):
    """Arcee's MLP has no gate_proj: the default seven names apply as the six it has (PEFT applies a list that
    matches some layers too); a gate_proj asked for by name beside names that match is skipped with a warning, as
    PEFT skips it; alone, or a name outside the seven, it is an error naming the layers."""
    from fasttune.errors import ConfigError

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("arcee")))
    assert FastLanguageModel.get_peft_model(model, r=4).lora_settings.target_modules == [
        "down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("arcee")))
    with pytest.warns(UserWarning, match=r"\['gate_proj'\] match no layer of this model and are skipped"):
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["gate_proj", "up_proj"])
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"up_proj"}
    for targets, bad in ((["gate_proj"], "gate_proj"), (["up_proj", "gate_projj"], "gate_projj")):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("arcee")))
        with pytest.raises(ConfigError, match=rf"\['{bad}'\] match no layer"):
            FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
