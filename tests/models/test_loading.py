"""Loading: sharded checkpoints, bad paths, unsupported architectures, offline hub ids."""
import json

import pytest
import torch
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.models.loading import load_model


def test_sharded_checkpoint_loads(tmp_path, tiny_tokenizer):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    ours, _ = load_model(tmp_path / "m", torch.float32, "cpu")
    ids = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_returns_tokenizer_and_fp32_on_cpu(tiny_model_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    assert tok is not None and tok.pad_token_id is not None
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nope"))


def test_other_architecture_loads_through_the_fallback(tmp_path):
    """Architectures outside our decoder are no longer refused: transformers+PEFT, with a warning
    (tests/models/test_fallback.py trains them; an architecture transformers cannot train still errors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fasttune.models.fallback import FallbackModel, FallbackWarning

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    with pytest.warns(FallbackWarning, match="'gpt2' is not supported by fasttune's fast decoder"):
        model, _ = load_model(tmp_path / "g", torch.float32, "cpu")
    assert isinstance(model, FallbackModel) and model.config.vocab_size == 100


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is disabled"):
        FastLanguageModel.from_pretrained("some-org/some-model")


def test_checkpoint_config_mismatch(tmp_path):
    save_hf(hf_model("llama"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(tmp_path / "m", torch.float32, "cpu")


def test_folder_without_weights(tmp_path):
    hf_model("llama").config.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="No weights"):
        load_model(tmp_path / "m", torch.float32, "cpu")


def test_unknown_kwarg_is_a_clear_error(tiny_model_dir):
    from fasttune.errors import ConfigError

    folder = str(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match="unknown argument"):
        FastLanguageModel.from_pretrained(folder, not_an_option=1)
