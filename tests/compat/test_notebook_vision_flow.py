"""The peer's (Unsloth's) vision notebooks (Llama 3.2 Vision, Qwen2.5-VL, Gemma 3; and LLaVA-NeXT) with only the
import changed, on tiny random models offline: FastVisionModel with use_gradient_checkpointing="unsloth", the
layer-group switches, rows converted to conversations with PIL images, for_inference and the notebook's `tokenizer(image, input_text, ...)` +
generate with a TextStreamer, for_training, TRL's SFTTrainer with UnslothVisionDataCollator and the notebook's
SFTConfig (TRL 1.x names: `processing_class=`, `max_length=`), the saved adapter loaded back with its processor, and
the merged checkpoint in transformers."""
import math

import pytest
import torch
from tiny_vision import noise_image

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")
INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."


def _dataset(n=4):
    return [{"image": noise_image((40 + 8 * i, 56), i), "caption": f"finding number {i}"} for i in range(n)]


def convert_to_conversation(sample):
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": INSTRUCTION},
                                     {"type": "image", "image": sample["image"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": sample["caption"]}]},
    ]
    return {"messages": conversation}


@pytest.mark.parametrize("folder, trainer_from", [("mllama_vl_dir", "fasttune"), ("mllama_vl_dir", "trl"),
                                                  ("qwen_vl_dir", "trl"), ("gemma3_vl_dir", "trl"),
                                                  ("llava_next_vl_dir", "fasttune")])
def test_vision_notebook_flow(folder, trainer_from, request, tmp_path, monkeypatch):
    """trainer_from="fasttune": the notebook's trainer cell verbatim with `from fasttune import SFTTrainer,
    SFTConfig` (tokenizer=, max_seq_length=, a list of rows); "trl": TRL 1.16's own SFTTrainer, which takes
    processing_class= and max_length= and a datasets.Dataset (the peer patches TRL to take the old forms; we do not)."""
    from transformers import AutoModelForImageTextToText, TextStreamer

    from fasttune import FastVisionModel, is_bf16_supported
    from fasttune.trainer import UnslothVisionDataCollator

    base = request.getfixturevalue(folder)
    monkeypatch.chdir(tmp_path)
    model, tokenizer = FastVisionModel.from_pretrained(str(base), load_in_4bit=False,
                                                       use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
                                           lora_alpha=16, lora_dropout=0, bias="none", random_state=3407,
                                           use_rslora=False, loftq_config=None)
    dataset = _dataset()
    converted_dataset = [convert_to_conversation(sample) for sample in dataset]

    FastVisionModel.for_inference(model)
    image = dataset[0]["image"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    input_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    inputs = tokenizer(image, input_text, add_special_tokens=False, return_tensors="pt").to("cpu")
    assert "pixel_values" in inputs
    text_streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(**inputs, streamer=text_streamer, max_new_tokens=8, use_cache=True, temperature=1.5,
                         min_p=0.1)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 8

    FastVisionModel.for_training(model)
    notebook_args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=1, max_steps=2,
                         learning_rate=2e-4, fp16=not is_bf16_supported(), bf16=is_bf16_supported(), logging_steps=1,
                         optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
                         output_dir="outputs", report_to="none", remove_unused_columns=False, dataset_text_field="",
                         dataset_kwargs={"skip_prepare_dataset": True})
    if trainer_from == "fasttune":
        from fasttune import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, tokenizer=tokenizer,
                             data_collator=UnslothVisionDataCollator(model, tokenizer),
                             train_dataset=converted_dataset,
                             args=SFTConfig(**notebook_args, dataset_num_proc=4, max_seq_length=2048))
    else:
        from datasets import Dataset

        trainer = trl.SFTTrainer(model=model, processing_class=tokenizer,
                                 data_collator=UnslothVisionDataCollator(model, tokenizer),
                                 train_dataset=Dataset.from_list(converted_dataset),
                                 args=trl.SFTConfig(**notebook_args, max_length=2048))
    trainer_stats = trainer.train()
    history = trainer.state.log_history if trainer_from == "trl" else trainer.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert trainer_stats.global_step == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert trainer_stats.metrics["train_runtime"] > 0  # the notebook prints it

    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    FastVisionModel.for_inference(model)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    loaded, processor = FastVisionModel.from_pretrained("lora_model", load_in_4bit=False)
    FastVisionModel.for_inference(loaded)
    again = processor(image, input_text, add_special_tokens=False, return_tensors="pt")
    assert torch.equal(loaded.generate(**again, max_new_tokens=6, do_sample=False), want)

    model.save_pretrained_merged("unsloth_finetune", tokenizer)
    merged = AutoModelForImageTextToText.from_pretrained("unsloth_finetune", dtype=torch.float32).eval()
    assert type(merged).__name__.endswith("ForConditionalGeneration")
