"""Prompt-only rows (GRPO's `prompt`) -> token ids: text as TRL tokenizes it, messages through the chat template
with the assistant header, and bad prompts named."""
import pytest

from fasttune.data.prompts import encode_prompt
from fasttune.errors import DataError
from tiny_tokenizer import make_tiny_tokenizer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_text_prompt_keeps_the_tokenizers_special_tokens(tiny_tokenizer):
    prompt, ids = encode_prompt("2+2=", tiny_tokenizer, "Row 0")
    assert prompt == "2+2=" and ids == tiny_tokenizer("2+2=")["input_ids"]


def test_message_prompt_is_rendered_with_the_generation_header(tiny_tokenizer):
    prompt, ids = encode_prompt(MESSAGES, tiny_tokenizer, "Row 0")
    assert prompt == MESSAGES
    want = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    assert ids == list(want)
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_template_that_writes_a_special_token_gets_no_second_one():
    tok = make_tiny_tokenizer(chat_template="{{ eos_token }}" + make_tiny_tokenizer().chat_template)
    _, ids = encode_prompt([{"role": "user", "content": "hi"}], tok, "Row 0")
    assert ids.count(tok.eos_token_id) == 1 and ids[0] == tok.eos_token_id


def test_arrow_null_keys_are_dropped(tiny_tokenizer):
    prompt, _ = encode_prompt([{"role": "user", "content": "hi", "name": None}], tiny_tokenizer, "Row 0")
    assert prompt == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("value, match", [
    (None, r"Row 3: field 'prompt' is missing or null"),
    ("", r"Row 3.*'prompt'"),
    (7, r"Row 3: field 'prompt' must be a string or a list"),
    ([], r"Row 3: field 'prompt' is an empty list"),
    ([{"role": "robot", "content": "x"}], r"Row 3, prompt\[0\] has the role 'robot'"),
    ([{"role": "user", "content": 1}], r"Row 3, prompt\[0\]: 'content' must be a string"),
])
def test_bad_prompts_name_the_row_and_field(tiny_tokenizer, value, match):
    with pytest.raises(DataError, match=match):
        encode_prompt(value, tiny_tokenizer, "Row 3")


def test_messages_need_a_chat_template():
    with pytest.raises(DataError, match=r"Row 0: field 'prompt' is a message list but the tokenizer has no chat"):
        encode_prompt(MESSAGES, make_tiny_tokenizer(chat_template=None), "Row 0")


def test_template_errors_become_data_errors():
    tok = make_tiny_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"Row 0: the tokenizer's chat template could not render .*roles must alt"):
        encode_prompt(MESSAGES, tok, "Row 0")
