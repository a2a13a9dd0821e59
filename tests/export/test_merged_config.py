"""The merged model's config.json records its dtype without tripping transformers' torch_dtype deprecation."""
import json

import transformers.configuration_utils as configuration_utils

from fasttune import FastLanguageModel


def test_merged_config_records_dtype_without_deprecated_torch_dtype(tiny_model_dir, tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(configuration_utils.logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)))
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert not [m for m in said if "torch_dtype" in m]
