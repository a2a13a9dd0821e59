"""train/lean_count.py: what lean saves spare per layer, by the modules that run the fused path. (Its counts are
checked against the saved tensors' bytes across families in tests/kernels/test_rebuild.py.)"""
import torch

from fasttune import FastLanguageModel
from fasttune.train.lean_count import lean_values


def test_lean_values_of_a_tiny_model_on_the_fused_path(tiny_model_dir, monkeypatch):
    """Counted only where the fused LoRA path runs: not for a projection without LoRA, nor on the torch path."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    h = model.arch.hidden_size
    attention_only = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    assert lean_values(attention_only) == [0, h]  # (the first layer's norm output needs no gradient)
    monkeypatch.setenv("FASTTUNE_KERNELS", "torch")
    assert lean_values(attention_only) == [0, 0]


def test_first_layer_counts_when_the_embedding_trains_and_dora_never(tiny_model_dir, monkeypatch):
    """A training embedding gives the first norm's output a gradient (its rebuild then frees it); DoRA layers are
    not the fused path, so nothing is counted for them."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    folder = tiny_model_dir("llama")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    h, i = model.arch.hidden_size, model.arch.intermediate_size
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.get_input_embeddings().weight.requires_grad_(True)
    assert lean_values(model) == [2 * h + i, 2 * h + i]
    dora, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    dora = FastLanguageModel.get_peft_model(dora, r=4, use_dora=True)
    assert lean_values(dora) == [0, 0]
