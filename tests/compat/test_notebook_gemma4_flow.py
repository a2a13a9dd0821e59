"""The peer's (Unsloth's) Gemma 4 text notebook with only the import changed, on a tiny Gemma 4 vision-language model
whose tokenizer has Gemma 4's turn tokens: FastModel hands back the processor, get_chat_template(processor,
"gemma-4"), TRL's SFTTrainer on rendered texts with that processor, response-only masking by the notebook's markers,
inference through apply_chat_template(tokenize=True, return_dict=True), and a conversational dataset given to TRL
with the processor. Found broken before: the template's EOS reached only the processor (not its tokenizer, which TRL
and generate read), TRL took the first row of a text-only call that was not batched, tokenize=True was refused, and
TRL's chat_template=None collided with the processor's own."""
import math

import pytest
import torch

trl = pytest.importorskip("trl")

ROWS = [{"conversations": [{"from": "human", "value": "Give me a word that rhymes with cat."},
                           {"from": "gpt", "value": "Hat rhymes with cat."}]},
        {"conversations": [{"from": "human", "value": "Boiling point of water?"}, {"from": "gpt", "value": "100 C."}]}]


@pytest.fixture(scope="module")
def gemma4_turns_dir(tmp_path_factory):
    from tiny_vision import save_gemma4
    from transformers import AutoTokenizer

    folder = save_gemma4(tmp_path_factory.mktemp("gemma4-flow") / "m")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(["<|turn>", "<turn|>", "<bos>"], special_tokens=True)  # ids 265-267, inside the 272 rows
    tok.bos_token = "<bos>"
    tok.save_pretrained(folder)
    return folder


def test_gemma4_text_flow(gemma4_turns_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    from fasttune import FastModel
    from fasttune.chat_templates import get_chat_template, standardize_data_formats, train_on_responses_only

    monkeypatch.chdir(tmp_path)
    model, tokenizer = FastModel.from_pretrained(model_name=str(gemma4_turns_dir), max_seq_length=128,
                                                 load_in_4bit=False, full_finetuning=False)
    model = FastModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                     finetune_attention_modules=True, finetune_mlp_modules=True,
                                     finetune_audio_layers=False, r=8, lora_alpha=8, lora_dropout=0, bias="none",
                                     random_state=3407)
    tokenizer = get_chat_template(tokenizer, chat_template="gemma-4")
    turn_end = tokenizer.convert_tokens_to_ids("<turn|>")
    assert tokenizer.tokenizer.eos_token == "<turn|>" and tokenizer.eos_token_id == turn_end

    dataset = standardize_data_formats(Dataset.from_list(ROWS))
    dataset = dataset.map(lambda ex: {"text": [tokenizer.apply_chat_template(c, tokenize=False).removeprefix("<bos>")
                                               for c in ex["conversations"]]}, batched=True)
    assert dataset[0]["text"] == ("<|turn>user\nGive me a word that rhymes with cat.<turn|>\n<|turn>model\n"
                                  "Hat rhymes with cat.<turn|>\n")
    trainer = trl.SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=trl.SFTConfig(dataset_text_field="text", max_length=128, per_device_train_batch_size=2, max_steps=2,
                           learning_rate=2e-4, logging_steps=1, output_dir="outputs", report_to="none", bf16=False))
    trainer = train_on_responses_only(trainer, instruction_part="<|turn>user\n", response_part="<|turn>model\n")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i, row in enumerate(ROWS):
        ids, kept = batch["input_ids"][i], batch["labels"][i] != -100
        # the answer with its "<turn|>\n"; TRL appends the EOS (<turn|>) to texts that do not end with it
        assert tokenizer.decode(ids[kept]) == row["conversations"][1]["value"] + "<turn|>\n<turn|>"
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    from tiny_vision import solid_image  # the template set by name still places images (as the processor expands)

    seen = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": solid_image("red")},
                                                                       {"type": "text", "text": "What?"}]}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)
    assert "pixel_values" in seen and tokenizer.decode(seen["input_ids"][0]).startswith("<bos><|turn>user\n<|image>")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Rhyme with dog?"}]}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt").to("cpu")
    assert tokenizer.decode(inputs["input_ids"][0]) == "<bos><|turn>user\nRhyme with dog?<turn|>\n<|turn>model\n"
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 4
    assert torch.equal(out[0, :inputs["input_ids"].shape[1]], inputs["input_ids"][0])

    # a conversational dataset straight into TRL with the processor (TRL renders it through apply_chat_template,
    # tokenize=True, with its own chat_template=None)
    conv = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}]}] * 2)
    chats = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=conv,
                           args=trl.SFTConfig(max_length=128, per_device_train_batch_size=2, max_steps=1,
                                              output_dir="conv", report_to="none", bf16=False))
    batch = chats.data_collator([chats.train_dataset[i] for i in range(2)])
    assert tokenizer.decode(batch["input_ids"][0]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
    chats.train()
