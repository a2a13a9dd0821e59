"""Cohere 2 (Command R7B, Command A): attention and MLP side by side on one LayerNorm's output, RoPE on adjacent pairs
in the sliding layers only, logits times logit_scale. The shared family tests (tests/tiny.py's FAMILIES: logits,
LoRA against PEFT, generation, GGUF in llama.cpp) run its 3-sliding-1-full layout; here the recompute modes (the
parallel block keeps no attention block under "offload") and the GGUF layouts llama.cpp cannot read."""
import pytest
import torch
from peft_oracle import randomize_lora_b
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError

pytest.importorskip("transformers.models.cohere2")


def test_recompute_and_offload_give_the_gradients_of_no_recompute(tmp_path):
    folder = save_hf(hf_model("cohere2"), tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    assert not any(layer.self_attn.keeps_block for layer in model.model.layers)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in (False, True, "offload"):
        model.gradient_checkpointing = mode
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for mode in (True, "offload"):
        assert grads[mode].keys() == grads[False].keys()
        for n, g in grads[False].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {n}")


def test_gguf_refuses_layouts_llama_cpp_does_not_read(tmp_path):
    """llama.cpp's cohere2 slides every layer but each 4th; another layout is refused before anything is written."""
    types = ["sliding_attention", "full_attention"] * 2
    folder = save_hf(hf_model("cohere2", layer_types=types), tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="the only layout llama.cpp's cohere2 reads"):
        model.save_pretrained_gguf(str(tmp_path / "m.gguf"), tok)
    assert not (tmp_path / "m.gguf").exists()
