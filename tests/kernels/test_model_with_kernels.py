"""The whole tiny model with the Triton kernels on equals the torch path: logits, LoRA grads, 20-step losses."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(folder):
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device=DEVICE)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    return model, tok


def _logits_and_grads(folder, kernels, monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    model, _ = _model(folder)
    torch.manual_seed(4)
    ids = torch.randint(3, 300, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), return_logits=True)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "phi3", "smollm3", "olmo3", "granite",
                                    "ernie4_5", "glm4", "hunyuan_v1_dense", "arcee",
                                    "apertus", "granitemoehybrid", "falcon_h1"])
def test_logits_and_lora_grads_equal_torch_path(family, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FASTTUNE_SSD", "torch")  # (the fused chunks: the next test)
    folder = tiny_model_dir(family)
    ref_logits, ref_grads = _logits_and_grads(folder, "torch", monkeypatch)
    logits, grads = _logits_and_grads(folder, "triton", monkeypatch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", ["granitemoehybrid", "nemotron_h", "falcon_h1"])
def test_fused_ssd_chunks_equal_torch_path(family, tiny_model_dir, monkeypatch):
    """The Mamba-2 hybrids with the fused within-chunk kernels (kernels/ssd_chunk.py, the default)
    give the torch path's logits and LoRA gradients (left padding in the batch)."""
    folder = tiny_model_dir(family)
    ref_logits, ref_grads = _logits_and_grads(folder, "torch", monkeypatch)
    monkeypatch.setenv("FASTTUNE_SSD", "triton")
    logits, grads = _logits_and_grads(folder, "triton", monkeypatch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_dropout_masks_equal_torch_path(tiny_model_dir, monkeypatch):
    """In training with LoRA dropout the fused path draws the same masks, in the same order, as the module path."""
    folder = tiny_model_dir("llama")
    results = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device=DEVICE)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.3,
                                                 use_gradient_checkpointing=False)
        randomize_lora_b(model)
        model.train()
        ids = torch.randint(3, 300, (2, 9), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))
        torch.manual_seed(9)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[kernels] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for n, g in results["triton"][1].items():
        torch.testing.assert_close(g, results["torch"][1][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow  # ~40 s in the Triton interpreter on 2 CPU cores
def test_20_step_losses_equal_torch_path(tiny_model_dir, tmp_path, monkeypatch):
    folder = tiny_model_dir("llama")
    rows = [{"text": "kc " + "ab " * (i % 3 + 1)} for i in range(16)]
    curves = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
        model, tok = _model(folder)
        args = SFTConfig(output_dir=str(tmp_path / kernels), max_steps=20, learning_rate=5e-3,
                         per_device_train_batch_size=1, gradient_accumulation_steps=1, lr_scheduler_type="constant")
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
        trainer.train()
        curves[kernels] = [h["loss"] for h in trainer.log_history]
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), rtol=2e-5, atol=0)
