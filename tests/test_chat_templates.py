"""fasttune.chat_templates: the helper names users of Unsloth import, on tiny tokenizers and models."""
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from fasttune.chat_templates import (apply_chat_template, get_chat_template, standardize_data_formats,
                                     standardize_sharegpt, to_sharegpt, train_on_responses_only)
from fasttune.errors import ConfigError, DataError
from tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer

MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
           "<end_of_turn>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_sep|>", "<|turn>",
           "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|end_of_turn|>"]
SHAREGPT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
STANDARD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, STANDARD[0]]
IM_END, EOS = 258, 256


def marker_tokenizer():
    """The tiny byte tokenizer with every format's markers as special tokens (ids 259...) and a BOS token."""
    tok = make_tiny_tokenizer(chat_template=None)
    tok.add_tokens(MARKERS, special_tokens=True)
    tok.bos_token = "<bos>"
    return tok


def rendered(name, messages, gen, **kwargs):
    tok = get_chat_template(marker_tokenizer(), name, **kwargs)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("name, messages, gen, expected", [
    ("chatml", SHAREGPT, False, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"),
    ("chatml", SHAREGPT[:1], True, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama-3", SHAREGPT, False, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"),
    ("llama-31", SYSTEM, True, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                               "Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("gemma3", STANDARD, False, "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
                                "Hello!<end_of_turn>\n"),
    ("gemma", SYSTEM, True, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"),
    ("qwen3", SHAREGPT[:1], True, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen2.5", SHAREGPT[:1], False, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                     "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"),
    ("phi-3", STANDARD, False, "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"),
    ("phi-4", SHAREGPT[:1], True, "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>"),
    ("mistral", SYSTEM + STANDARD[1:], False, "<bos>[INST] Be brief.\n\nHi [/INST] Hello!<|endoftext|>"),
    ("zephyr", SHAREGPT[:1], True, "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"),
    ("vicuna", SHAREGPT, False, "A conversation between a user and an AI assistant that answers accurately and "
                                "politely. USER: Hi ASSISTANT: Hello!<|endoftext|>"),
    ("unsloth", SHAREGPT[:1], True, "You are a helpful assistant.\n>>> User: Hi\n>>> Assistant: "),
    ("alpaca", STANDARD, False, "The following is an instruction describing a task. Write a response that fulfils "
                                "the request.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|endoftext|>\n\n"),
    ("gemma-4", SYSTEM + STANDARD[1:], False, "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
                                              "<|turn>model\nHello!<turn|>\n"),
    ("gemma4", SHAREGPT[:1], True, "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"),
    ("gemma-4-thinking", SHAREGPT[:1], True, "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n"
                                             "<channel|>"),
    ("qwen3-thinking", [STANDARD[0], {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"}], False,
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello!<|im_end|>\n"),
    ("qwen3-thinking", STANDARD, False, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>"
                                        "\n\nHello!<|im_end|>\n"),
    ("qwen3-thinking", SHAREGPT[:1], True, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"),
    ("lfm-2.5", SHAREGPT[:1], True, "<bos><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama", SYSTEM + STANDARD[1:], False, "<bos>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! "
                                            "<|endoftext|>"),
    ("vicuna_old", SHAREGPT[:1], True, "<bos>A chat between a curious human and an artificial intelligence "
                                       "assistant. The assistant gives helpful, detailed, and polite answers to the "
                                       "human's questions.\n### Human: Hi\n### Assistant:"),
    ("starling", STANDARD, False, "<bos>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello!"
                                  "<|end_of_turn|>"),
    ("gemma_chatml", SHAREGPT[:1], True, "<bos><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
])
def test_get_chat_template_renders_exactly(name, messages, gen, expected):
    assert rendered(name, messages, gen) == expected


def test_gemma_4_thinking_switch():
    """enable_thinking=True opens the system turn with <|think|> (one is opened for it when there is none); the
    thinking variant then prompts without the empty thought channel."""
    tok = get_chat_template(marker_tokenizer(), "gemma-4")
    assert tok.apply_chat_template(SYSTEM, tokenize=False, add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    tok = get_chat_template(marker_tokenizer(), "gemma-4-thinking")
    assert tok.apply_chat_template(STANDARD[:1], tokenize=False, add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    with pytest.raises(ConfigError, match="gpt-oss checkpoints ship OpenAI's harmony template; keep the tokenizer's"):
        get_chat_template(marker_tokenizer(), "gpt-oss")


def test_mapping_and_system_message():
    mapping = {"role": "speaker", "content": "text", "user": "Q", "assistant": "A"}
    rows = [{"speaker": "Q", "text": "Hi"}, {"speaker": "A", "text": "Hello!"}]
    assert rendered("chatml", rows, False, mapping=mapping, system_message="Be kind.") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n")


@pytest.mark.parametrize("name, marker", [("chatml", "<|im_end|>"), ("llama-3.1", "<|eot_id|>"),
                                          ("gemma-3", "<end_of_turn>"), ("phi-3", "<|end|>"), ("phi-4", "<|im_end|>"),
                                          ("mistral", "<|endoftext|>"), ("alpaca", "<|endoftext|>"),
                                          ("gemma-4", "<turn|>")])
def test_map_eos_token(name, marker):
    tok = get_chat_template(marker_tokenizer(), name)
    assert tok.eos_token == marker and tok.eos_token_id == tok.convert_tokens_to_ids(marker)
    assert get_chat_template(marker_tokenizer(), name, map_eos_token=False).eos_token == "<|endoftext|>"


def test_custom_template_pair():
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    tok = get_chat_template(make_tiny_tokenizer(), (jinja, "<|im_end|>"))
    assert tok.eos_token_id == IM_END
    assert tok.apply_chat_template(SHAREGPT, tokenize=False) == "user: Hi<|im_end|>assistant: Hello!<|im_end|>"


def test_markers_missing_from_the_vocabulary_are_an_error():
    tok = make_tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"needs <\|begin_of_text\|>, <\|start_header_id\|>.*add_new_tokens"):
        get_chat_template(tok, "llama-3")
    with pytest.raises(ConfigError, match="'<\\|eot\\|>'.*add_new_tokens"):
        get_chat_template(tok, ("{{ messages[0]['content'] }}", "<|eot|>"))
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|endoftext|>"  # left unchanged
    with pytest.raises(ConfigError, match="'llama-9' is not a known template name.*chatml, llama-3, .*unsloth"):
        get_chat_template(tok, "llama-9")


# --- datasets ---------------------------------------------------------------------------------------------------

def test_unsloth_dataset_flow_exact():
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "input": "",
                                                                        "output": "Hi!"}]
    ds = to_sharegpt(Dataset.from_list(rows), merged_prompt="{instruction}[[\nInput: {input}]]")
    ds = standardize_sharegpt(ds)
    assert standardize_data_formats(ds) is ds
    out = apply_chat_template(ds, make_tiny_tokenizer(), default_system_message="Be brief.")
    assert out.column_names == ["text"]
    assert out["text"] == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd.\nInput: 2 and 3<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHi!"
        "<|im_end|>\n",
    ]


def test_apply_chat_template_options_and_errors():
    ds = Dataset.from_list([{"conversations": SHAREGPT, "id": 7}])
    out = apply_chat_template(ds, make_tiny_tokenizer(chat_template=None), chat_template="alpaca")
    assert out["id"] == [7]
    assert out["text"][0].endswith("### Instruction:\nHi\n\n### Response:\nHello!<|endoftext|>\n\n")
    with pytest.raises(ConfigError, match="no chat template.*chatml"):
        apply_chat_template(ds, make_tiny_tokenizer(chat_template=None))
    with pytest.raises(DataError, match="no 'messages' or 'conversations' column.*'text'"):
        apply_chat_template(Dataset.from_list([{"text": "x"}]), make_tiny_tokenizer())
    bad = Dataset.from_list([{"conversations": SHAREGPT}, {"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"Row 1 of the dataset, conversations\[0\] has the unknown role 'robot'"):
        apply_chat_template(bad, make_tiny_tokenizer())


# --- templates written with {INPUT} / {OUTPUT} / {SYSTEM} placeholders ---------------------------------------------

TASK_TEMPLATE = "Below is a task. Write a reply that completes it.\n\n### Task:\n{INPUT}\n\n### Reply:\n{OUTPUT}"
TWO_TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


def test_placeholder_template_one_example():
    """The user's turn starts where the text before {INPUT} begins like the assistant's opening ("\n\n### "); the
    rest is the default system text. No special token follows {OUTPUT}, so EOS is written there."""
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "input": "",
                                                                        "output": "Hi!"}]
    ds = standardize_sharegpt(to_sharegpt(Dataset.from_list(rows), merged_prompt="{instruction}[[\nInput: {input}]]",
                                          output_column_name="output"))
    tok = make_tiny_tokenizer()
    out = apply_chat_template(ds, tok, chat_template=TASK_TEMPLATE)
    head = "Below is a task. Write a reply that completes it."
    assert out["text"] == [head + "\n\n### Task:\nAdd.\nInput: 2 and 3\n\n### Reply:\n5<|endoftext|>",
                           head + "\n\n### Task:\nSay hi.\n\n### Reply:\nHi!<|endoftext|>"]
    # The template is now the tokenizer's: generation prompts and multi-turn chats follow it.
    assert tok.apply_chat_template(TWO_TURNS[:3], tokenize=False, add_generation_prompt=True) == (
        head + "\n\n### Task:\nQ1\n\n### Reply:\nA1<|endoftext|>\n\n### Task:\nQ2\n\n### Reply:\n")
    # A conversation's system message (or default_system_message) takes the default system text's place.
    assert tok.apply_chat_template([{"role": "system", "content": "Be brief."}, TWO_TURNS[0]], tokenize=False) == (
        "Be brief.\n\n### Task:\nQ1")
    other = apply_chat_template(ds, make_tiny_tokenizer(), chat_template=TASK_TEMPLATE, default_system_message="Hm.")
    assert other["text"][1] == "Hm.\n\n### Task:\nSay hi.\n\n### Reply:\nHi!<|endoftext|>"


CHATML_ONE = ("<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INPUT}<|im_end|>\n"
              "<|im_start|>assistant\n{OUTPUT}<|im_end|>\n")
CHATML_TWO = CHATML_ONE + "<|im_start|>user\n{INPUT}<|im_end|>\n<|im_start|>assistant\n{OUTPUT}<|im_end|>\n"


@pytest.mark.parametrize("template", [CHATML_ONE, CHATML_TWO])
def test_placeholder_template_with_system_and_end_marker(template):
    """ChatML written out: the same as the built-in chatml with a default system message; <|im_end|> after
    {OUTPUT} is a special token, so no EOS is added. One example and the two-example form read alike."""
    tok = get_chat_template(make_tiny_tokenizer(), template, system_message="Be kind.")
    expected = get_chat_template(make_tiny_tokenizer(), "chatml", system_message="Be kind.", map_eos_token=False)
    for messages in (TWO_TURNS, TWO_TURNS[:1], SYSTEM):
        for gen in (False, True):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                expected.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.eos_token == "<|endoftext|>"  # placeholder templates name no end-of-turn token to map


def test_placeholder_template_errors():
    tok = make_tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"\{INPUT\} where the user's message goes"):
        get_chat_template(tok, "{OUTPUT} then {INPUT}")
    with pytest.raises(ConfigError, match="not written the same way"):
        get_chat_template(tok, "U: {INPUT}\nA: {OUTPUT}\nUser: {INPUT}\nA: {OUTPUT}\n")
    with pytest.raises(ConfigError, match=r"has a \{SYSTEM\} part"):
        get_chat_template(tok, CHATML_ONE)
    assert tok.chat_template == CHATML_TEMPLATE  # left unchanged by the failed calls
    ds = Dataset.from_list([{"conversations": SHAREGPT}, {"conversations": SHAREGPT + [{"from": "tool",
                                                                                        "value": "x"}]}])
    with pytest.raises(DataError, match="Row 1 .*user and assistant turns only, not tool"):
        apply_chat_template(ds, tok, chat_template=TASK_TEMPLATE)


# --- train_on_responses_only -------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
]


def byte_ids(text):
    """Token ids of text in the tiny tokenizer (bytes, with <|im_start|>/<|im_end|> as 257/258)."""
    return make_tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def expected_labels(conversation, eos=False):
    """ChatML render of `conversation` -> labels with only the assistant answers + '<|im_end|>\\n' kept."""
    labels = []
    for m in conversation:
        head = byte_ids(f"<|im_start|>{m['role']}\n")
        body = byte_ids(m["content"] + "<|im_end|>\n")
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return labels + ([EOS] if eos else [])  # text rows end with EOS, which follows the last answer


@pytest.fixture
def our_model(tiny_model_dir):
    from fasttune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), tok


@pytest.mark.parametrize("packing", [False, True])
def test_our_trainer(our_model, tmp_path, packing):
    from fasttune import SFTConfig, SFTTrainer

    model, tok = our_model
    texts = apply_chat_template(Dataset.from_list([{"messages": c} for c in CONVERSATIONS]), tok)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                     gradient_accumulation_steps=1, packing=packing, max_seq_length=256, shuffle=False)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=texts, eval_dataset=texts, args=args)
    assert train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                   response_part="<|im_start|>assistant\n") is trainer
    expected = [expected_labels(c, eos=True) for c in CONVERSATIONS]
    if packing:  # one packed row, longest document first; packing masks each document's first token
        assert [ex["labels"] for ex in trainer.train_examples] == [expected[1] + expected[0]]
    else:
        assert [ex["labels"] for ex in trainer.train_examples] == expected
        assert [ex["labels"] for ex in trainer.eval_examples] == expected
    # Left out, the parts come from the tokenizer's chat template: the same masks.
    again = SFTTrainer(model=model, tokenizer=tok, train_dataset=texts, args=args)
    train_on_responses_only(again)
    assert list(again.train_examples) == list(trainer.train_examples)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.log_history[0]["loss"]))


def test_a_part_that_never_occurs_is_named(our_model, tmp_path):
    from fasttune import SFTConfig, SFTTrainer

    model, tok = our_model
    texts = apply_chat_template(Dataset.from_list([{"messages": c} for c in CONVERSATIONS]), tok)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=texts, args=SFTConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"response_part='<\|im_start\|>bot\\n'.*occurs in no row of the training"):
        train_on_responses_only(trainer, instruction_part="<|im_start|>user\n", response_part="<|im_start|>bot\n")
    with pytest.raises(ConfigError, match=r"instruction_part='### User:'"):
        train_on_responses_only(trainer, instruction_part="### User:")


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from tiny import hf_model

    tok = make_tiny_tokenizer()
    data = Dataset.from_list([{"messages": c} for c in CONVERSATIONS])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                         use_cpu=True, report_to=[], bf16=False, save_strategy="no", logging_steps=1,
                         max_length=256, seed=0)
    trainer = trl.SFTTrainer(model=hf_model("llama"), args=args, train_dataset=data, eval_dataset=data,
                             processing_class=tok)
    assert train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                   response_part="<|im_start|>assistant\n") is trainer
    for ds in (trainer.train_dataset, trainer.eval_dataset):
        batch = trainer.data_collator([ds[i] for i in range(2)])
        rows = [expected_labels(c) for c in CONVERSATIONS]
        width = max(map(len, rows))
        expected = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        order = [0, 1] if len(ds[0]["input_ids"]) < len(ds[1]["input_ids"]) else [1, 0]
        assert torch.equal(batch["labels"], expected[order])
        kept = batch["labels"][batch["labels"] != -100].tolist()
        assert IM_END in kept  # the end-of-turn marker is a target
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_collator_switch_for_datasets_without_labels():
    # Older TRL builds labels in the collator from a completion_mask column when completion_only_loss is on.
    tok = make_tiny_tokenizer()
    ids = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    data = Dataset.from_list([{"input_ids": byte_ids(ids)}])
    trainer = SimpleNamespace(processing_class=tok, train_dataset=data, eval_dataset=None,
                              data_collator=SimpleNamespace(completion_only_loss=False))
    train_on_responses_only(trainer)
    assert trainer.data_collator.completion_only_loss is True
    assert trainer.train_dataset["completion_mask"] == [[int(v != -100) for v in expected_labels(CONVERSATIONS[0])]]
