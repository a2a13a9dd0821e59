"""QLoRA: our trainer on an NF4 base against transformers + PEFT + bitsandbytes on the same bnb-4bit checkpoint."""
import pytest
import torch
from peft_oracle import reference_sft_losses

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

pytest.importorskip("bitsandbytes")


def _rows(n=16):
    words = ["red", "green", "blue", "cyan", "amber"]
    return [{"text": " ".join(words[(i * 3 + j) % 5] for j in range(3 + i % 7))} for i in range(n)]


def _bnb_peft(folder, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=qc, device_map="cpu",
                                                dtype=torch.float32)
    # train(): bitsandbytes' eval mode on AVX512-BF16 CPUs uses a bf16 inference kernel.
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=True).train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_20_qlora_steps_equal_transformers_peft_bitsandbytes(tiny_model_dir, tiny_tokenizer, tmp_path, checkpointing):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    bnb_dir = tmp_path / "bnb4"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), quantization_config=qc, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(bnb_dir)
    tiny_tokenizer.save_pretrained(bnb_dir)

    model, tok = FastLanguageModel.from_pretrained(str(bnb_dir), load_in_4bit=True, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    model.save_pretrained(tmp_path / "init")
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=5e-3, lr_scheduler_type="constant", max_steps=20, max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    batches = trainer.step_batches(0, 0)
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]

    theirs = reference_sft_losses(_bnb_peft(bnb_dir, tmp_path / "init"), batches, 20, lr=5e-3)
    assert ours[-1] < ours[0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-3, atol=0)
