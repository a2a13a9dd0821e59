"""Saving in a distributed run: only rank 0 writes (DDP's replicas are identical; FSDP's shards are gathered first),
so ranks that all call the save methods do not race to write one folder."""
import torch
import torch.distributed as dist

from fasttune import FastLanguageModel
from fasttune.sharding import writes_here


def test_only_rank_zero_writes(tiny_model_dir, tmp_path, monkeypatch):
    from bpe_tokenizers import make_bpe_tokenizer

    tokenizer = make_bpe_tokenizer("gpt2")  # (GGUF needs a tokenizer with merges)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama", vocab_size=416)), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert writes_here(model)  # no process group: a plain run writes
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert not writes_here(model)
    out = tmp_path / "out"
    out.mkdir()
    model.save_pretrained(out / "adapter")
    model.save_pretrained_merged(out / "merged", tokenizer, save_method="merged_16bit")
    model.save_pretrained_merged(out / "lora", tokenizer, save_method="lora")
    path = model.save_pretrained_gguf(out / "m.gguf", tokenizer, quantization_method="f16", progress=False)
    assert path == out / "m.gguf" and not list(out.iterdir())  # rank 1 wrote nothing
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    model.save_pretrained(out / "adapter")
    assert (out / "adapter" / "adapter_model.safetensors").exists()
