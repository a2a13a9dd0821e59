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


# Damaged files: each is one ModelLoadError naming the file and what to do, before any tensor is used.
def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def _to_bin(folder):
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


DAMAGED = {  # name: (change the saved folder, the file named, words of the message)
    "safetensors truncated": (lambda d: _cut(d / "model.safetensors", lambda n: n // 2), "model.safetensors",
                              "as safetensors: the file is truncated, corrupt"),
    "safetensors garbage": (lambda d: (d / "model.safetensors").write_bytes(b"<html>Not Found</html>" * 9),
                            "model.safetensors", "as safetensors: the file is truncated, corrupt"),
    "bin truncated": (lambda d: (_to_bin(d), _cut(d / "pytorch_model.bin", lambda n: n - 100)),
                      "pytorch_model.bin", "zip archive torch.save writes has no end"),
    "bin garbage": (lambda d: (_to_bin(d), (d / "pytorch_model.bin").write_bytes(b"garbage" * 50)),
                    "pytorch_model.bin", "neither the zip archive torch.save writes nor a pickle"),
    "bin legacy pickle damaged": (lambda d: (_to_bin(d), (d / "pytorch_model.bin").write_bytes(b"\x80\x02junk")),
                                  "pytorch_model.bin", "may hold tensors only"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "llama",'), "config.json",
                             "is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    "config.json not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "llama\xe9"}'),
                              "config.json", "is not UTF-8 text: byte 0xe9 on line 1"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[]"), "config.json", "must hold an object"),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("{"),
                       "model.safetensors.index.json", "is not valid JSON"),
    "index without weight_map": (lambda d: (d / "model.safetensors.index.json").write_text("{}"),
                                 "model.safetensors.index.json", "has no 'weight_map'"),
    "tokenizer.json not JSON": (lambda d: (d / "tokenizer.json").write_text("{oops"), "tokenizer.json",
                                "Save the tokenizer again"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_model_file_is_named(case, tiny_model_dir):
    change, name, words = DAMAGED[case]
    folder = tiny_model_dir("llama")
    change(folder)
    with pytest.raises(ModelLoadError) as e:
        FastLanguageModel.from_pretrained(str(folder))
    msg = str(e.value)
    assert f"{folder / name}" in msg and words in msg, msg
    assert "\n" not in msg


def test_damaged_weights_named_on_the_transformers_path_too(tiny_model_dir):
    """fast=False loads through transformers, whose error would blame the architecture."""
    folder = tiny_model_dir("llama")
    _cut(folder / "model.safetensors", lambda n: n - 10)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors' as safetensors: the file is truncated.*again"):
        FastLanguageModel.from_pretrained(str(folder), fast=False)


def _tiny_gguf(tmp_path):
    from bpe_tokenizers import make_bpe_tokenizer

    save_hf(hf_model("llama", vocab_size=416), tmp_path / "g", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "g"))
    return model.save_pretrained_gguf(tmp_path / "m.gguf", tok, quantization_method="f16", progress=False)


def test_damaged_gguf_is_named(tmp_path):
    path = _tiny_gguf(tmp_path)
    _cut(path, lambda n: n // 2)
    with pytest.raises(ModelLoadError, match=r"Cannot read '.*m\.gguf' as GGUF: the file is truncated, corrupt.*"
                                             r"Download or copy it again"):
        FastLanguageModel.from_pretrained(str(path))
    (tmp_path / "page.gguf").write_text("<html>404 Not Found</html>")
    with pytest.raises(ModelLoadError, match=r"page\.gguf' is not a GGUF file \(it does not start with the GGUF "
                                             r"magic bytes.*Download the \.gguf file again"):
        FastLanguageModel.from_pretrained(str(tmp_path / "page.gguf"))


@pytest.mark.parametrize("fast", [True, False])
def test_damaged_adapter_is_named(fast, tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), fast=fast)
    FastLanguageModel.get_peft_model(model, r=4).save_pretrained(tmp_path / "a", tok)
    weights, config = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    _cut(weights, lambda n: n - 10)
    with pytest.raises(ModelLoadError, match=r"adapter_model\.safetensors' as safetensors: the file is truncated.*"
                                             r"Save the adapter again"):
        FastLanguageModel.from_pretrained(str(tmp_path / "a"), fast=fast)
    config.write_text(config.read_text()[:-20])
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json' is not valid JSON: .* at line \d+, column "
                                             r"\d+\. .*Save the adapter again"):
        FastLanguageModel.from_pretrained(str(tmp_path / "a"), fast=fast)
    config.write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json has no LoRA rank 'r'"):
        FastLanguageModel.from_pretrained(str(tmp_path / "a"), fast=fast)


def test_damaged_nf4_metadata_is_named():
    from fasttune.quant.nf4 import quant_state_meta

    with pytest.raises(ModelLoadError, match=r"m\.safetensors: 'q_proj\.weight': the 4-bit quantisation metadata"):
        quant_state_meta(torch.tensor(list(b'{"shape": [2'), dtype=torch.uint8), "m.safetensors: 'q_proj.weight'")
    assert quant_state_meta(torch.tensor(list(b'{"shape": [2], "dtype": "float16", "blocksize": 64}'),
                                         dtype=torch.uint8), "w")["blocksize"] == 64


def test_attention_dropout_in_the_config_is_named_as_not_applied(tmp_path, recwarn):
    """Granite 3 ships attention_dropout=0.1, which transformers applies in training and our attention does not."""
    save_hf(hf_model("granite", attention_dropout=0.1), tmp_path / "g")
    with pytest.warns(UserWarning, match="attention_dropout=0.1 is not applied"):
        FastLanguageModel.from_pretrained(str(tmp_path / "g"))
    save_hf(hf_model("phi3", resid_pdrop=0.1, embd_pdrop=0.05), tmp_path / "p")
    with pytest.warns(UserWarning, match="resid_pdrop=0.1, embd_pdrop=0.05 are not applied"):
        FastLanguageModel.from_pretrained(str(tmp_path / "p"))
    save_hf(hf_model("granite"), tmp_path / "z")
    recwarn.clear()
    FastLanguageModel.from_pretrained(str(tmp_path / "z"))
    assert not [w for w in recwarn if "not applied" in str(w.message)]


def test_our_decoder_built_on_another_architecture_points_to_the_fallback():
    """CausalLM / ModelConfig on a config we do not run: the error names the families and from_pretrained's
    transformers+PEFT fallback."""
    from fasttune.models.config import ModelConfig

    with pytest.raises(ModelLoadError, match=r"'falcon' is not supported .*glm4, hunyuan_v1_dense.*through "
                                             r"transformers\+PEFT \(the fallback\)"):
        ModelConfig.from_hf({"model_type": "falcon"})
