"""Rows already rendered with the chat template (one BOS, not two) and `tools` / `documents` passed to the
template, against TRL 1.16's SFTTrainer / DPOTrainer tokenization and apply_chat_template."""
import json
import logging

import pytest
from datasets import Dataset
from tiny import hf_model
from tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer

from fasttune.data import tokenize_rows
from fasttune.data.preference import tokenize_preference_rows
from fasttune.errors import DataError

trl = pytest.importorskip("trl")

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
# A ChatML template that writes tools into the system turn (as Qwen 2.5's does) and documents after them.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nYou may call these functions:\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% if documents %}{% for doc in documents %}{{ '<|im_start|>document\n' + doc['text'] + '<|im_end|>\n' }}"
    "{% endfor %}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{{ message['tool_calls'] | tojson }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CALL = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "sunny"},
             {"role": "assistant", "content": "It is sunny."}]


def bos_tokenizer():
    """The tiny byte-level tokenizer with a BOS `<s>` that it adds in front of text (as Llama's does), and a
    template that starts with the BOS token."""
    from tokenizers import processors

    tok = make_tiny_tokenizer("{{ bos_token }}" + CHATML_TEMPLATE)
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                                         special_tokens=[("<s>", bos)])
    assert tok("a")["input_ids"] == [bos, ord("a")]
    return tok


def trl_sft_ids(rows, tok, tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False,
                         save_strategy="no", max_length=None)
    trainer = trl.SFTTrainer(model=hf_model("llama"), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    return list(trainer.train_dataset["input_ids"])


def test_text_rendered_with_the_template_gets_one_bos(tmp_path, caplog):
    tok = bos_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    rows = [{"text": rendered}, {"text": "plain words"}]
    with caplog.at_level(logging.WARNING, logger="fasttune.data"):
        ours = [ex["input_ids"] for ex in tokenize_rows(rows, tok, max_seq_length=512)]
    theirs = trl_sft_ids(rows, tok, tmp_path)
    # TRL tokenizes the rendered text with the tokenizer's BOS in front of the template's: two.
    assert theirs[0][:2] == [bos, bos] and theirs[0][2] != bos
    assert ours[0] == theirs[0][1:]
    # ...and ours are the conversation's own tokens (apply_chat_template), plus the EOS both append to text rows.
    assert ours[0] == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"] + [eos]
    assert ours[1] == theirs[1] and ours[1][:2] == [bos, ord("p")]  # plain text: the tokenizer's BOS, as in TRL
    said = [r.getMessage() for r in caplog.records if "BOS" in r.getMessage()]
    assert len(said) == 1 and "1 of 2 rows" in said[0] and "'<s>'" in said[0]


def test_prompt_completion_prompt_rendered_with_the_template_gets_one_bos(tmp_path):
    tok = bos_tokenizer()
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    rows = [{"prompt": prompt, "completion": "4<|im_end|>\n"}]
    ours = tokenize_rows(rows, tok, max_seq_length=512)[0]["input_ids"]
    theirs = trl_sft_ids(rows, tok, tmp_path)[0]
    assert theirs[:2] == [tok.bos_token_id] * 2 and ours == theirs[1:]


def test_dpo_string_prompt_rendered_with_the_template_gets_one_bos(tmp_path):
    tok = bos_tokenizer()
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    rows = [{"prompt": prompt, "chosen": "4", "rejected": "5"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    with pytest.warns(UserWarning, match="already start with the BOS token '<s>'"):
        ours = tokenize_preference_rows(rows, tok, max_seq_length=512)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False, save_strategy="no")
    theirs = trl.DPOTrainer(model=hf_model("llama"), ref_model=hf_model("llama"), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tok).train_dataset
    assert theirs[0]["prompt_ids"][:2] == [tok.bos_token_id] * 2
    assert ours[0]["prompt_ids"] == theirs[0]["prompt_ids"][1:]
    assert ours[1]["prompt_ids"] == theirs[1]["prompt_ids"]  # a plain prompt keeps the tokenizer's BOS
    for ex, t in zip(ours, theirs):
        assert ex["chosen_ids"] == t["chosen_ids"] and ex["rejected_ids"] == t["rejected_ids"]


@pytest.mark.parametrize("form", ["list", "json string", "jsonl"])
def test_tools_reach_the_template_as_in_trl(form, tmp_path, caplog):
    tok = make_tiny_tokenizer(TOOLS_TEMPLATE)
    tools = json.dumps(TOOLS) if form == "json string" else TOOLS
    rows = [{"messages": TOOL_CALL, "tools": tools}]
    data = rows
    if form == "jsonl":
        data = tmp_path / "calls.jsonl"
        # A second row with another tool: Arrow gives both rows the union of keys, filled with None.
        other = [{"type": "function", "function": {"name": "now", "description": "The time",
                                                   "parameters": {"type": "object", "properties": {
                                                       "zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}]
        data.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": TOOL_CALL, "tools": other}) + "\n")
    with caplog.at_level(logging.WARNING, logger="fasttune.data"):
        ours = tokenize_rows(data if form != "jsonl" else str(data), tok, max_seq_length=4096)[0]["input_ids"]
    oracle = tok.apply_chat_template(TOOL_CALL, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    without = tok.apply_chat_template(TOOL_CALL, tokenize=True, return_dict=True)["input_ids"]
    assert ours == oracle and len(oracle) > len(without) + 100
    if form != "jsonl":  # TRL reads the same row the same way (from JSONL it keeps Arrow's None-filled keys)
        assert ours == trl_sft_ids(rows, tok, tmp_path)[0]
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


def test_tools_in_the_responses_only_prefixes_and_documents(tmp_path):
    tok = make_tiny_tokenizer(TOOLS_TEMPLATE)
    docs = [{"title": "w", "text": "Paris is sunny today."}]
    rows = [{"messages": TOOL_CALL, "tools": TOOLS, "documents": docs}]
    ex = tokenize_rows(rows, tok, max_seq_length=4096, train_on_responses_only=True)[0]
    full = tok.apply_chat_template(TOOL_CALL, tools=TOOLS, documents=docs, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    targets = tok.decode([t for t in ex["labels"] if t != -100])
    # Only the two assistant turns are targets; the tools and documents sit in the masked prompt.
    call = json.dumps(TOOL_CALL[1]["tool_calls"])
    assert targets == f"{call}<|im_end|>\nIt is sunny.<|im_end|>\n"


def test_ignored_columns_are_named_once(caplog, tiny_tokenizer):
    rows = [{"messages": CONVERSATION, "tools": TOOLS, "id": 1}, {"messages": CONVERSATION, "tools": TOOLS, "id": 2}]
    with caplog.at_level(logging.WARNING, logger="fasttune.data"):
        tokenize_rows(rows, tiny_tokenizer, max_seq_length=512)  # ChatML without tools: they cannot show
    said = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(said) == 1 and "'id'" in said[0] and "'tools' (the chat template does not use it)" in said[0]


def test_tools_that_are_not_a_list_of_objects_name_the_row(tiny_tokenizer):
    with pytest.raises(DataError, match="Row 0 of the dataset: field 'tools' is a string that is not JSON"):
        tokenize_rows([{"messages": CONVERSATION, "tools": "[{oops"}], tiny_tokenizer, max_seq_length=512)
    with pytest.raises(DataError, match="field 'tools' must be a list of objects"):
        tokenize_rows([{"messages": CONVERSATION, "tools": [1, 2]}], tiny_tokenizer, max_seq_length=512)


@pytest.mark.parametrize("form", ["list", "json string"])
def test_preference_chat_rows_pass_tools_as_trl(form, tmp_path, caplog):
    """DPO and KTO rows of messages pass the row's `tools` to the template, as TRL 1.16's DPOTrainer/KTOTrainer do
    (they were dropped); string rows cannot use them, and a column that reaches no token is named once."""
    from fasttune.data.preference import tokenize_unpaired_rows

    tok = make_tiny_tokenizer(TOOLS_TEMPLATE)
    tools = json.dumps(TOOLS) if form == "json string" else TOOLS
    prompt, answer = TOOL_CALL[:3], TOOL_CALL[3:]
    paired = [{"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": "No idea."}],
               "tools": tools, "id": 7}]
    with caplog.at_level(logging.WARNING, logger="fasttune.data"):
        ours = tokenize_preference_rows(paired, tok, max_seq_length=4096)[0]
    said = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(said) == 1 and "'id'" in said[0] and "tools" not in said[0]
    # the oracle: apply_chat_template(..., tools=tools), and TRL's own tokenization of the same row
    with_tools = tok.apply_chat_template(prompt + answer, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert ours["prompt_ids"] + ours["chosen_ids"] == with_tools
    assert len(ours["prompt_ids"]) > len(tok.apply_chat_template(prompt, add_generation_prompt=True)) + 100
    args = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False, save_strategy="no")
    theirs = trl.DPOTrainer(model=hf_model("llama"), ref_model=hf_model("llama"), args=trl.DPOConfig(**args),
                            train_dataset=Dataset.from_list(paired), processing_class=tok).train_dataset[0]
    assert [ours[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == [
        theirs[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]

    unpaired = [{"prompt": prompt, "completion": answer, "label": True, "tools": tools},
                {"prompt": prompt, "completion": [{"role": "assistant", "content": "No."}], "label": False,
                 "tools": tools}]
    ours = tokenize_unpaired_rows(unpaired, tok, max_seq_length=4096)
    theirs = trl.KTOTrainer(model=hf_model("llama"), ref_model=hf_model("llama"), args=trl.KTOConfig(**args),
                            train_dataset=Dataset.from_list(unpaired), processing_class=tok).train_dataset
    keys = ("prompt_ids", "completion_ids", "label")
    assert [[ex[k] for k in keys] for ex in ours] == [[t[k] for k in keys] for t in theirs]
    assert ours[0]["prompt_ids"] + ours[0]["completion_ids"] == with_tools

    caplog.clear()
    strings = [{"prompt": "Weather?", "chosen": "sunny", "rejected": "no", "tools": tools}]
    with caplog.at_level(logging.WARNING, logger="fasttune.data"):
        tokenize_preference_rows(strings, tok, max_seq_length=4096)
    said = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(said) == 1 and "'tools' (only chat rows use it)" in said[0]


def test_grpo_string_prompt_rendered_with_the_template_gets_one_bos():
    """A GRPO prompt string already rendered with the chat template: the tokens of apply_chat_template (one BOS),
    where tokenizing the string as TRL 1.16 does adds a second."""
    from fasttune.data.prompts import encode_prompt

    tok = bos_tokenizer()
    rendered = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    oracle = tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2  # TRL's encoding of a string prompt
    with pytest.warns(UserWarning, match="already start with the BOS token '<s>'"):
        assert encode_prompt(rendered, tok, "Row 0")[1] == oracle
    assert encode_prompt("2+2=", tok, "Row 1")[1] == tok("2+2=")["input_ids"]  # a plain prompt keeps its BOS
