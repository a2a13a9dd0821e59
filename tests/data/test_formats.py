import pytest

from fasttune.data import detect_format
from fasttune.data.formats import (
    alpaca_prompt,
    alpaca_to_messages,
    sharegpt_to_messages,
    validate_messages,
)
from fasttune.errors import DataError


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["input_ids", "labels", "text"], "tokenized"),
        (["messages", "text"], "messages"),
        (["conversations"], "sharegpt"),
        (["instruction", "input", "output", "text"], "alpaca"),
        (["prompt", "completion"], "prompt-completion"),
        (["text", "id"], "text"),
        (["messages", "conversations"], "messages"),
    ],
)
def test_auto_detection(columns, expected):
    assert detect_format(columns) == expected


def test_custom_text_field():
    assert detect_format(["body"], dataset_text_field="body") == "text"
    with pytest.raises(DataError):
        detect_format(["body"])


def test_override():
    assert detect_format(["messages", "text"], "text") == "text"
    assert detect_format(["prompt", "completion", "text"], "prompt-completion") == "prompt-completion"
    with pytest.raises(DataError, match="declared as 'sharegpt'.*'conversations'.*columns found: 'messages'"):
        detect_format(["messages"], "sharegpt")
    with pytest.raises(DataError, match="Unknown data format 'csv'"):
        detect_format(["text"], "csv")


def test_no_usable_column_lists_columns_and_layouts():
    with pytest.raises(DataError) as err:
        detect_format(["question", "answer"], source_name="qa.jsonl")
    msg = str(err.value)
    assert "qa.jsonl" in msg and "'question', 'answer'" in msg
    for layout in ["input_ids", "messages", "conversations", "instruction", "prompt", "text"]:
        assert layout in msg
    with pytest.raises(DataError, match="preference data"):
        detect_format(["prompt", "chosen", "rejected"])


def test_sharegpt_roles():
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "tool", "value": "{}"},
    ]
    assert sharegpt_to_messages(conv, "Row 0") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "tool", "content": "{}"},
    ]


def test_sharegpt_unknown_role():
    with pytest.raises(DataError, match=r"Row 3 of d.jsonl, conversations\[1\] has the unknown role 'robot'"):
        sharegpt_to_messages([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], "Row 3 of d.jsonl")


def test_messages_validation():
    ok = [{"role": "user", "content": "a", "name": None}, {"role": "assistant", "content": "b"}]
    assert validate_messages(ok, "Row 0") == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    expect = [{"role": "assistant", "content": "x"}]
    assert validate_messages('[{"role": "assistant", "content": "x"}]', "Row 0") == expect
    bad = [
        ([], "Row 5: field 'messages' is empty"),
        (None, "field 'messages' is empty"),
        ("not json", "not a JSON list"),
        ({"role": "user"}, "must be a list"),
        (["hi"], r"messages\[0\] is a str, not a dict"),
        ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
        ([{"content": "x"}], "no string 'role'"),
        ([{"role": "assistant", "content": 3}], "'content' must be a string, but it is a int"),
        ([{"role": "user", "content": "x"}], "no assistant message"),
    ]
    for raw, match in bad:
        with pytest.raises(DataError, match=match):
            validate_messages(raw, "Row 5")


def test_alpaca_conversion():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert alpaca_to_messages(row, "Row 0") == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert alpaca_to_messages({**row, "input": ""}, "Row 0")[0]["content"] == "Add the numbers."
    prompt = alpaca_prompt("Add the numbers.", "2 and 3")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n" in prompt
    assert "### Input:" not in alpaca_prompt("Say hi.", "")
    with pytest.raises(DataError, match="Row 0: field 'output' is empty"):
        alpaca_to_messages({**row, "output": " "}, "Row 0")


def test_message_list_is_the_one_check_for_conversational_fields():
    """Preference rows and GRPO prompts read their message fields through formats.message_list."""
    import pytest as _pytest

    from fasttune.data import formats, preference, prompts
    from fasttune.errors import DataError

    assert preference.message_list is formats.message_list is prompts.message_list  # prompts: GRPO's prompt rows
    assert formats.message_list("hi", "Row 0", "prompt", "user") == [{"role": "user", "content": "hi"}]
    assert formats.message_list([{"role": "user", "content": "a", "tool_calls": None}], "Row 0", "prompt", "user") \
        == [{"role": "user", "content": "a"}]
    for bad, match in [([], "empty list"), ([{"role": "robot", "content": "x"}], r"prompt\[0\] has the role"),
                       ([{"role": "user", "content": 3}], "'content' must be a string"), (5, "must be a string")]:
        with _pytest.raises(DataError, match=match):
            formats.message_list(bad, "Row 0", "prompt", "user")


def test_a_text_column_beside_sharegpt_conversations_is_what_trains():
    """The notebooks format `conversations` into `text` themselves (e.g. Gemma 3's drops the template's <bos>) and
    TRL's SFTTrainer trains on `text`; so does fasttune. `messages` beside `text` stay chat rows, as in TRL."""
    assert detect_format(["conversations", "text"]) == "text"
    assert detect_format(["conversations", "body"], dataset_text_field="body") == "text"
    assert detect_format(["conversations"]) == "sharegpt"
    assert detect_format(["messages", "text"]) == "messages"
    assert detect_format(["conversations", "text"], "sharegpt") == "sharegpt"
