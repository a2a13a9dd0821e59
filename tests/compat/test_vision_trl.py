"""The vision notebooks' TRL code with only the import changed: trl.SFTTrainer with our VisionDataCollator
(as UnslothVisionDataCollator) and processor trains a fasttune vision-language model with the same per-step
losses and adapter as our own SFTTrainer."""
import io

import pytest
import torch
import trl
from tiny_vision import solid_image

STEPS = 3


def _rows(n=6):
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        solid_image(((40 * i) % 256, 120, 200), (28 * (1 + i % 3), 56)).save(buf, format="PNG")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": buf.getvalue()}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"colour {i}"}]}]})
    return rows


def _model(folder):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(folder))
    return FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), proc


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["qwen_vl_dir", "gemma3_vl_dir", "mllama_vl_dir"])
def test_trl_sft_trainer_with_the_vision_collator_equals_ours(family, request, tmp_path):
    from datasets import Dataset

    from fasttune import SFTConfig, SFTTrainer
    from fasttune.trainer import UnslothVisionDataCollator  # where the notebooks import it from (unsloth.trainer)

    folder = request.getfixturevalue(family)
    rows = _rows()
    model, proc = _model(folder)  # each step takes every row, so the data order cannot matter
    ours = SFTTrainer(model=model, tokenizer=proc, train_dataset=rows, args=SFTConfig(
        output_dir=str(tmp_path / "ours"), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
        learning_rate=1e-2, lr_scheduler_type="constant", max_steps=STEPS, optim="adamw_torch"))
    ours.train()
    our_losses, our_params = [h["loss"] for h in ours.log_history if "loss" in h], _trainable(model)

    model, proc = _model(folder)
    theirs = trl.SFTTrainer(model=model, processing_class=proc, data_collator=UnslothVisionDataCollator(model, proc),
                            train_dataset=Dataset.from_list(rows), args=trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
        learning_rate=1e-2, lr_scheduler_type="constant", max_steps=STEPS, optim="adamw_torch", logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, seed=0, save_strategy="no", gradient_checkpointing=False,
        remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True}))
    theirs.train()
    losses = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(our_losses), rtol=1e-5, atol=0)
    params = _trainable(model)
    for n, p in our_params.items():  # (atol: Adam's first steps turn float noise in near-zero LoRA A gradients into
        # updates of ~lr x 1e-4; Llama 3.2 Vision's gated cross-attention MLP shows 3e-6)
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-5, msg=n)
