"""Loading for FSDP (from_pretrained(fsdp=True)): every loaded tensor kept on build_model's `store` while the
quantisation runs on `device`, the ranks after the first building from the headers alone, and the models FSDP does
not shard refused before any weight is read.

On the CPU the store is the meta device: a tensor that skipped the store would stay on the CPU. The GPU half (quantised
on the GPU, kept on the host, moved back layer by layer by shard_model) is tests/gpu/test_gpu_fsdp_loading.py.
"""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.file_readers import iter_safetensors
from fasttune.models.loading import build_model, load_model


def _tensors(model) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("quant", [None, "nf4", "int8", "fp8"])
def test_every_loaded_tensor_is_kept_on_the_store(quant, tiny_model_dir):
    folder = tiny_model_dir("llama", attention_bias=True)  # (biases: loaded before or after their weight)
    plain, _ = load_model(folder, torch.bfloat16, "cpu", quant=quant)
    kept = build_model(AutoConfig.from_pretrained(folder), iter_safetensors(folder / "model.safetensors"),
                       torch.bfloat16, "cpu", str(folder), quant, store="meta")
    want, got = _tensors(plain), _tensors(kept)
    assert sorted(got) == sorted(want)
    assert [n for n, t in got.items() if not t.is_meta] == []
    assert {n: (t.shape, t.dtype) for n, t in got.items()} == {n: (t.shape, t.dtype) for n, t in want.items()}
    assert kept.lm_head.weight is kept.model.embed_tokens.weight or not kept.arch.tie_embeddings


def test_meta_store_builds_from_the_headers_alone(tiny_model_dir, tmp_path):
    """A rank after the first (store="meta"): the model built from the safetensors headers, every tensor on the meta
    device; a .bin checkpoint or a GGUF cannot be read so, and is read and kept in host memory instead; a damaged
    header is named."""
    folder = tiny_model_dir("llama")
    plain, _ = load_model(folder, torch.bfloat16, "cpu", quant="nf4")
    meta, _ = load_model(folder, torch.bfloat16, "cpu", quant="nf4", store="meta")
    assert all(t.is_meta for t in _tensors(meta).values())
    assert {n: (t.shape, t.dtype) for n, t in _tensors(meta).items()} == \
        {n: (t.shape, t.dtype) for n, t in _tensors(plain).items()}
    binary = tmp_path / "bin"
    binary.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (binary / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(folder / "model.safetensors")), binary / "pytorch_model.bin")
    host, _ = load_model(binary, torch.bfloat16, "cpu", quant="nf4", store="meta")
    for name, t in _tensors(plain).items():
        assert torch.equal(_tensors(host)[name], t), name
    from bpe_tokenizers import make_bpe_tokenizer
    from tiny import hf_model, save_hf

    save_hf(hf_model("llama", vocab_size=416), tmp_path / "g", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "g"))
    gguf = model.save_pretrained_gguf(tmp_path / "m.gguf", tok, quantization_method="f16", progress=False)
    from_gguf, _ = load_model(gguf, torch.float32, "cpu", store="meta")  # (a GGUF is read: kept on the host)
    assert all(t.device.type == "cpu" for t in _tensors(from_gguf).values())
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(folder, torch.bfloat16, "cpu", store="meta")


def test_a_classifier_head_is_drawn_where_it_would_be_and_kept_on_the_store(tiny_model_dir):
    folder = tiny_model_dir("llama")
    head = {"num_labels": 2}
    torch.manual_seed(0)
    plain, _ = load_model(folder, torch.float32, "cpu", classifier=head)
    torch.manual_seed(0)
    kept = build_model(AutoConfig.from_pretrained(folder), iter_safetensors(folder / "model.safetensors"),
                       torch.float32, "cpu", str(folder), model_cls=type(plain), store="meta")
    assert kept.score.weight.is_meta and plain.score.weight.abs().sum() > 0


def test_models_fsdp_does_not_shard_are_refused_before_loading(tmp_path, tiny_model_dir):
    from tiny_vision import qwen_vl_config

    vision = tmp_path / "vl"
    qwen_vl_config().save_pretrained(vision)  # (a config alone: refused before any weight is looked for)
    with pytest.raises(ConfigError, match=r"fsdp=True\): .*sequence classifier on a qwen2_5_vl vision-language"):
        load_model(vision, torch.float32, "cpu", store="cpu", classifier={"num_labels": 2})
    with pytest.raises(ConfigError, match="transformers fallback"):
        load_model(tiny_model_dir("llama"), torch.float32, "cpu", fast=False, store="cpu")


def test_a_vision_language_model_is_read_on_every_rank(qwen_vl_dir):
    """A vision-language checkpoint has no header-only build (transformers reads it whole): a rank after the first
    (store "meta") reads it too and keeps it in host memory, no tensor left on the meta device, NF4 as a plain
    load's."""
    from fasttune.models.vision import VisionCausalLM

    plain, _ = load_model(qwen_vl_dir, torch.float32, "cpu", quant="nf4")
    kept, _ = load_model(qwen_vl_dir, torch.float32, "cpu", quant="nf4", store="meta")
    assert isinstance(kept, VisionCausalLM) and kept.family is not None
    tensors = dict(kept.state_dict())
    assert tensors.keys() == plain.state_dict().keys()
    assert not any(t.is_meta for t in tensors.values()) and all(t.device.type == "cpu" for t in tensors.values())
    for name, t in plain.state_dict().items():
        assert torch.equal(tensors[name], t), name


def test_from_pretrained_fsdp(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    for offload in ("offload_embedding", "offload_lm_head"):
        with pytest.raises(ConfigError, match=f"fsdp=True shards .*{offload}=True"):
            FastLanguageModel.from_pretrained(folder, fsdp=True, **{offload: True})
    model, _ = FastLanguageModel.from_pretrained(folder, fsdp=True)  # without a GPU: loaded as usual
    assert model.device.type == "cpu" and getattr(model, "fsdp_device", None) is None

