"""GGUF files are read once (models/gguf_file.py) and give what transformers' GGUF readers give: the same config,
tokenizer (class, ids, chat template, saved files) and tensors; from_pretrained parses the file exactly once."""
import json

import pytest
import torch
from bpe_tokenizers import make_bpe_tokenizer
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.models import gguf_file
from fasttune.models.gguf_file import read_gguf

TEXTS = ["The quick brown fox.", "  two spaces\n\nand\ttabs, 12345", "Ünïcödé ★ — 日本語"]
# Families whose GGUF transformers reads back (it has no GGUF mapping for gemma; see tests/export/test_gguf.py).
READABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "lfm2"]


def _gguf(tmp_path, family="llama", quant="q8_0"):
    save_hf(hf_model(family, vocab_size=416), tmp_path / "hf", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "hf"))
    return model.save_pretrained_gguf(tmp_path / f"m.{quant}.gguf", tok, quantization_method=quant, progress=False)


def _transformers_reads(path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path), return_tensors=False)
    except (ValueError, NotImplementedError) as e:
        pytest.skip(f"transformers cannot read this GGUF: {e}")


@pytest.mark.parametrize("family", READABLE)
def test_config_tokenizer_fields_and_tensors_equal_transformers_reader(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _gguf(tmp_path, family)
    ref = _transformers_reads(path)
    ours = read_gguf(path)
    assert ours.config == ref["config"]
    assert ours.tokenizer == ref["tokenizer"] and ours.tokenizer_config == ref["tokenizer_config"]
    cfg = dict(ref["config"])
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    want = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    got = dict(ours.tensors(list(skeleton.state_dict())))
    assert sorted(got) == sorted(want)
    for name in want:  # q8_0 blocks dequantised and q/k rows un-permuted exactly as transformers does
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_tokenizer_equals_autotokenizer(family, tmp_path):
    from transformers import AutoTokenizer

    path = _gguf(tmp_path, family)
    want = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    got = read_gguf(path).build_tokenizer()
    assert type(got) is type(want)
    assert got.special_tokens_map == want.special_tokens_map and got.chat_template == want.chat_template
    for text in TEXTS:
        assert got(text)["input_ids"] == want(text)["input_ids"]
    got.save_pretrained(tmp_path / "got")
    want.save_pretrained(tmp_path / "want")
    assert (tmp_path / "got" / "tokenizer.json").read_text() == (tmp_path / "want" / "tokenizer.json").read_text()
    saved = [json.loads((tmp_path / d / "tokenizer_config.json").read_text()) for d in ("got", "want")]
    for config in saved:  # how transformers found the files, not what the tokenizer is
        config.pop("is_local", None), config.pop("local_files_only", None)
    assert saved[0] == saved[1]


def test_from_pretrained_parses_the_file_once(tmp_path, monkeypatch):
    """Config, weights and tokenizer all come from one parse; transformers' GGUF readers are not used."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    path = _gguf(tmp_path)
    want_model, want_tok = FastLanguageModel.from_pretrained(str(path))
    calls = []
    parse = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda blob: calls.append(1) or parse(blob))

    def refuse(*args, **kwargs):
        raise AssertionError("a second GGUF reader ran")

    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", refuse)
    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    model, tok = FastLanguageModel.from_pretrained(str(path))
    assert len(calls) == 1
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    assert ids[0].tolist() == want_tok(TEXTS[0])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want_model(ids).logits, rtol=0, atol=0)


def test_unsupported_architecture_and_truncated_tensor_data(tmp_path):
    path = _gguf(tmp_path, "gemma")  # transformers has no GGUF mapping for gemma (1)
    with pytest.raises(ModelLoadError, match=r"no GGUF mapping for architecture 'gemma'.*transformers folder"):
        FastLanguageModel.from_pretrained(str(path))
    path = _gguf(tmp_path / "l")
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the header is intact, the last tensor is not
    with pytest.raises(ModelLoadError, match=r"as GGUF: the file is truncated.*ends after the end of the file"):
        FastLanguageModel.from_pretrained(str(path))


@pytest.mark.slow
def test_smollm2_tokenizer_equals_autotokenizer(smollm2_loaded):
    from pathlib import Path

    from transformers import AutoTokenizer

    from fasttune.defaults import default_model_path

    path = Path(default_model_path())
    want = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, got = smollm2_loaded
    messages = [{"role": "user", "content": "What is LoRA?"}]
    assert type(got) is type(want) and got.special_tokens_map == want.special_tokens_map
    assert (got.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == want.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert got(text)["input_ids"] == want(text)["input_ids"]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "MXFP4", "F16", "Q5_0"])
def test_dequantize_fast_equals_gguf_bit_for_bit(kind):
    """The whole-tensor Q4_0/Q4_1/Q8_0/MXFP4 path gives gguf's float32 bits (other types are gguf's own), for 2-D
    and 3-D (stacked experts) tensors, zero scales and extreme values included."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    qtype = GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 512)).astype(np.float32) * np.float32(3.0)
    x[0, 0] = 0.0  # all-zero blocks: zero scale
    x[1, 1, :256] = np.float32(6.0e4)  # near fp16's largest scale
    for data in (x, x[0]):
        raw = quantize(data, qtype)
        got = gguf_file.dequantize_fast(raw, qtype)
        want = dequantize(raw, qtype)
        assert got.dtype == np.float32 and got.shape == want.shape == data.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
