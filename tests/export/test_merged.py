"""Merged checkpoints load in transformers and give our logits."""
import json

import pytest
import torch
from peft_oracle import randomize_lora_b
from tiny import FAMILIES

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_16bit_loads_in_transformers(family, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)))
    model = FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["lm_head"])
    randomize_lora_b(model)
    model.eval()
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tok.chat_template
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_method_lora_and_bad_method(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.save_pretrained_merged(tmp_path / "a", tok, save_method="lora")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="save_method"):
        model.save_pretrained_merged(tmp_path / "b", tok, save_method="merged_3bit")
    assert not (tmp_path / "b").exists()
    # the peer's name for merged_4bit (it refuses "merged_4bit" and asks for this one)
    model.save_pretrained_merged(tmp_path / "c", tok, save_method="merged_4bit_forced")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True


@pytest.mark.parametrize("family,expected", [("llama", "LlamaForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM"),
                                             ("phi3", "Phi3ForCausalLM")])
def test_config_names_its_transformers_class(family, expected, tiny_model_dir, tmp_path):
    """Configs built from GGUF metadata (or written without `architectures`) get the family's causal-LM class, on the
    loaded model and in what we save: tools that rebuild the model from the folder read it (TRL's DPOTrainer loads its
    reference model through config.architectures[0])."""
    import json

    from transformers import AutoConfig

    folder = tiny_model_dir(family)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    assert model.config.architectures == [expected]
    model.save_pretrained(tmp_path / "full")  # no LoRA: a transformers checkpoint
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.save_pretrained_merged(tmp_path / "merged", tok)
    for out in ("full", "merged"):
        assert AutoConfig.from_pretrained(tmp_path / out).architectures == [expected]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases beside FP8 weights
def test_merged_fp8_export_loads_in_transformers_and_here(family, tiny_model_dir, tmp_path):
    """save_method="merged_fp8" (any base: here an FP8-trained one): FineGrainedFP8 128 x 128 blocks of the merged
    weights; transformers (FineGrainedFP8Config(dequantize=True)) and fasttune read it to the same logits, near the
    merged 16-bit checkpoint's; the CLI writes it; MoE models are refused."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from fasttune.cli import main
    from fasttune.quant.fp8 import dequantize_fp8, quantize_fp8_blocks

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained_merged(tmp_path / "m16", tok)
    model.save_pretrained_merged(tmp_path / "m8", tok, save_method="merged_fp8")
    cfg = json.loads((tmp_path / "m8" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128]
    stored = load_file(str(tmp_path / "m8" / "model.safetensors"))
    plain = load_file(str(tmp_path / "m16" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert stored[name].dtype == torch.float8_e4m3fn and stored[name + "_scale_inv"].shape == (1, 1)
    assert stored["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight_scale_inv" not in stored
    q, s = quantize_fp8_blocks(plain[name])
    assert torch.equal(stored[name].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(stored[name + "_scale_inv"], s)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m8"), dtype=torch.float32,
                                                  quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m8"), dtype=torch.float32)
    m16, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m16"), dtype=torch.float32)
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(input_ids=ids).logits, m16(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() < 0.1 * c.abs().max()  # one 128 x 128 block per tiny matrix: e4m3 steps of its max
    torch.testing.assert_close(ours.model.layers[0].mlp.up_proj.weight,
                               dequantize_fp8(stored[name], stored[name + "_scale_inv"], (128, 128), torch.float32))
    if family != "llama":
        return
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "merged", "--quantization", "fp8",
                 "--output", str(tmp_path / "cli8")]) == 0
    assert json.loads((tmp_path / "cli8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    moe, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), dtype=torch.float32)
    with pytest.raises(ConfigError, match="merged_fp8' writes dense models"):
        moe.save_pretrained_merged(tmp_path / "moe", tok, save_method="merged_fp8")
