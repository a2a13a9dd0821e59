"""use_gradient_checkpointing="auto": the fastest policy that fits the free memory."""
from types import SimpleNamespace

import torch

from fasttune.models.config import ModelConfig
from fasttune.train import memory_policy
from fasttune.train.memory_policy import activation_bytes, choose_checkpointing

LLAMA_8B = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)


def _fake_gpu_model(monkeypatch, free_gib):
    monkeypatch.setattr(memory_policy.torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 0))
    return SimpleNamespace(arch=LLAMA_8B, dtype=torch.bfloat16, device=torch.device("cuda"))


def test_estimate_matches_the_measured_8b_activations():
    # Measured on an H200 (bench/results/lora_sft_h200.jsonl): 35.7 GiB peak without recompute, ~16 GiB of it
    # weights, at 2 x 2048 tokens. The estimate must be of that order, not a guess off by 2x.
    est = activation_bytes(LLAMA_8B, 4096, 2, recompute=False) / 2**30
    assert 15 < est < 24


def test_moe_estimate_counts_the_expert_rows():
    # Qwen3-30B-A3B shape, expert LoRA, 2 x 2048 tokens, no recompute, measured on an H200: 96.9 GiB peak with
    # ~71.5 GiB of bf16 weights and fp32 LoRA weights, grads and AdamW states, so ~25 GiB of activations. The
    # dense formula (intermediate_size 6144 per token) counted about half of that.
    moe = ModelConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, moe_layers=[True] * 48)
    est = activation_bytes(moe, 4096, 2, recompute=False) / 2**30
    assert 21 < est < 29
    dense_part = activation_bytes(ModelConfig(**{**moe.__dict__, "num_experts": 0}), 4096, 2, False) / 2**30
    assert dense_part < 0.65 * est
    assert activation_bytes(moe, 4096, 2, recompute=True) / 2**30 < est / 10


def test_picks_no_recompute_when_it_fits(monkeypatch):
    mode, why = choose_checkpointing(_fake_gpu_model(monkeypatch, 60), 4096)
    assert mode is False and "off" in why


def test_picks_recompute_when_only_that_fits(monkeypatch):
    mode, why = choose_checkpointing(_fake_gpu_model(monkeypatch, 12), 4096)
    assert mode is True and "recompute" in why


def test_picks_offload_when_nothing_else_fits(monkeypatch):
    mode, _ = choose_checkpointing(_fake_gpu_model(monkeypatch, 12), 131072)
    assert mode == "offload"


def test_cpu_keeps_everything(tiny_model_dir):
    from fasttune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert model.gradient_checkpointing == "auto"
    assert choose_checkpointing(model, 100)[0] is False
