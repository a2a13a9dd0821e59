"""Merged checkpoints load in transformers and give our logits."""
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
