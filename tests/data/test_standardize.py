import pytest
from datasets import Dataset, DatasetDict

from fasttune.data.standardize import standardize_data_formats, standardize_sharegpt
from fasttune.errors import ConfigError, DataError

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello!"}], "id": 0},
    {"conversations": [{"from": "HUMAN", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "id": 1},
]
STANDARD = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


def test_standardize_sharegpt_exact():
    out = standardize_sharegpt(Dataset.from_list(SHAREGPT))
    assert out["conversations"] == STANDARD
    assert out["id"] == [0, 1]  # other columns stay


def test_custom_aliases_and_dataset_dict():
    rows = [{"conversations": [{"from": "asker", "value": "Q"}, {"from": "bot", "value": "A"}]}]
    out = standardize_sharegpt(DatasetDict(train=Dataset.from_list(rows)), aliases_for_user=["asker"],
                               aliases_for_assistant=["bot"])
    assert out["train"]["conversations"] == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]


@pytest.mark.parametrize("turn, message", [
    ({"from": "robot", "value": "x"}, r"Row 1 of the dataset, conversations\[1\] has the role 'robot'.*aliases_for"),
    ({"from": "gpt", "value": None}, r"Row 1 of the dataset, conversations\[1\] has no text"),
])
def test_bad_rows_name_the_row(turn, message):
    rows = [SHAREGPT[1], {"conversations": [{"from": "human", "value": "q"}, turn], "id": 2}]
    with pytest.raises(DataError, match=message):
        standardize_sharegpt(Dataset.from_list(rows))


def test_empty_conversation_and_missing_column():
    rows = [{"conversations": []}]
    with pytest.raises(DataError, match="Row 0 of the dataset: field 'conversations' must be a non-empty list"):
        standardize_sharegpt(Dataset.from_list(rows))
    with pytest.raises(DataError, match="no column 'conversations' \\(or 'messages'\\).*'text'"):
        standardize_sharegpt(Dataset.from_list([{"text": "hi"}]))
    with pytest.raises(ConfigError, match="both 'user' and 'assistant'"):
        standardize_sharegpt(Dataset.from_list(SHAREGPT), aliases_for_assistant=["human"])
    with pytest.raises(ConfigError, match="datasets.Dataset"):
        standardize_sharegpt(SHAREGPT)


def test_standardize_data_formats():
    sharegpt = Dataset.from_list(SHAREGPT)
    assert standardize_data_formats(sharegpt)["conversations"] == STANDARD
    standard = Dataset.from_list([{"messages": m} for m in STANDARD])
    assert standardize_data_formats(standard) is standard  # already standard: untouched
    alpaca = Dataset.from_list([{"instruction": "a", "output": "b"}])
    assert standardize_data_formats(alpaca) is alpaca  # no conversations at all
    # Another column name and other keys are found too.
    dialog = Dataset.from_list([{"dialog": [{"role": "human", "text": "Q"}, {"role": "gpt", "text": "A"}]}])
    assert standardize_data_formats(dialog)["dialog"] == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]
