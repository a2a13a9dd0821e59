"""load_in_4bit / load_in_8bit: quantise-on-load, pre-quantised bitsandbytes checkpoints, and the errors."""
import json

import pytest
import torch
from peft_oracle import randomize_lora_b
from safetensors.torch import load_file, save_file

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.quant.linear import QuantLinear
from fasttune.quant.nf4 import dequantize_nf4_reference, quantize_nf4

pytest.importorskip("bitsandbytes")


def _bnb_model(folder, **kw):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kw.get("load_in_4bit"):
        kw.update(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=BitsAndBytesConfig(**kw),
                                                 device_map="cpu", dtype=torch.float32)
    # Train mode (the tiny configs have no dropout): in eval mode on CPUs with AVX512-BF16, bitsandbytes switches
    # Linear4bit to a bf16 inference kernel, which is not the fp32 dequantise-and-multiply we compare with.
    return model.train()


@pytest.fixture
def bnb4_dir(tiny_model_dir, tmp_path, tiny_tokenizer):
    """A "bnb-4bit" checkpoint as transformers + bitsandbytes save it."""
    folder = tmp_path / "bnb4"
    _bnb_model(tiny_model_dir("llama"), load_in_4bit=True).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_quantise_on_load_stores_nf4_of_each_weight(tiny_model_dir):
    folder = tiny_model_dir("qwen2")  # q/k/v biases must follow their weights into QuantLinear
    plain = load_file(str(folder / "model.safetensors"))
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 2 * 7 and "lm_head" not in quant
    for name, layer in quant.items():
        expect = quantize_nf4(plain[f"{name}.weight"])
        assert torch.equal(layer.packed, expect.packed) and torch.equal(layer.absmax, expect.absmax)
        if f"{name}.bias" in plain:
            assert torch.equal(layer.bias, plain[f"{name}.bias"])


def test_prequantised_checkpoint_gives_transformers_bnb_logits(bnb4_dir):
    ref = _bnb_model(bnb4_dir, load_in_4bit=True)  # reads the stored quantisation as is
    ours, _ = FastLanguageModel.from_pretrained(str(bnb4_dir), load_in_4bit=True, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # Without load_in_4bit the same checkpoint is dequantised into plain 16/32-bit weights.
    plain, _ = FastLanguageModel.from_pretrained(str(bnb4_dir), dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_int8_quantise_on_load_and_prequantised(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    ours, _ = FastLanguageModel.from_pretrained(str(folder), load_in_8bit=True, dtype=torch.float32)
    assert ours.model.layers[0].mlp.down_proj.quant_type == "int8"
    # Save our int8 model in bitsandbytes' keys with their config, reload it: same weights.
    out = tmp_path / "int8"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(out / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg))
    again, _ = FastLanguageModel.from_pretrained(str(out), load_in_8bit=True, dtype=torch.float32)
    a, b = ours.model.layers[1].self_attn.q_proj, again.model.layers[1].self_attn.q_proj
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scb, b.scb)


def test_incomplete_prequantised_checkpoint_is_named(bnb4_dir):
    f = bnb4_dir / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    del tensors[key]
    save_file(tensors, str(f))
    with pytest.raises(ModelLoadError, match="up_proj"):
        FastLanguageModel.from_pretrained(str(bnb4_dir), load_in_4bit=True, dtype=torch.float32)


def test_prequantised_shape_mismatch_is_named(bnb4_dir):
    cfg = json.loads((bnb4_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bnb4_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mlp\.down_proj\.weight' has shape \(64, 128\)"):
        FastLanguageModel.from_pretrained(str(bnb4_dir), load_in_4bit=True, dtype=torch.float32)


def test_bad_quantisation_options(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match="choose one"):
        FastLanguageModel.from_pretrained(folder, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(folder, load_in_4bit=True, full_finetuning=True)


def test_qlora_adapter_loads_in_peft_over_bnb_and_merges(bnb4_dir, tmp_path):
    from peft import PeftModel

    model, tok = FastLanguageModel.from_pretrained(str(bnb4_dir), load_in_4bit=True, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = PeftModel.from_pretrained(_bnb_model(bnb4_dir, load_in_4bit=True), str(tmp_path / "adapter")).train()
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(ours, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        # merged_16bit of a QLoRA model: dequantised base + delta, loadable by transformers.
        model.save_pretrained_merged(tmp_path / "merged", tok)
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(layer.dequantized_weight(torch.float32),
                       dequantize_nf4_reference(layer.state, torch.float32))


def test_merged_4bit_is_a_bnb_checkpoint_for_transformers_and_us(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    cfg = json.loads((tmp_path / "m4" / "config.json").read_text())["quantization_config"]
    assert cfg["load_in_4bit"] and cfg["bnb_4bit_quant_type"] == "nf4"
    ref = _bnb_model(tmp_path / "m4", load_in_4bit=True)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=True, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, theirs, rtol=1e-5, atol=1e-5)
    # The stored weights are the NF4 of the merged (base + LoRA delta) weights.
    from fasttune.export.merged import merged_state_dict

    merged = merged_state_dict(model, torch.float32)["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(ours.model.layers[1].mlp.up_proj.packed, quantize_nf4(merged).packed)
