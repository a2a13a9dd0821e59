import pytest
from datasets import Dataset

from fasttune.data.tabular import to_sharegpt
from fasttune.errors import ConfigError, DataError

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "source": "a"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "source": "b"},
    {"instruction": "Name a colour.", "input": None, "output": "Blue", "source": "c"},
]


def test_default_prompt_drops_empty_optional_parts():
    out = to_sharegpt(Dataset.from_list(ROWS))
    assert out.column_names == ["conversations"]
    assert out["conversations"] == [
        [{"from": "human", "value": "Add the numbers.\nYour input is:\n2 and 3"}, {"from": "gpt", "value": "5"}],
        [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}],
        [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue"}],
    ]


def test_custom_prompt_and_kept_columns():
    out = to_sharegpt(Dataset.from_list(ROWS), merged_prompt="[{source}] {instruction}[[ (given: {input})]]",
                      merged_column_name="prompt", remove_unused_columns=False)
    assert out["prompt"] == ["[a] Add the numbers. (given: 2 and 3)", "[b] Say hi.", "[c] Name a colour."]
    assert out["source"] == ["a", "b", "c"] and out["conversations"][1][1] == {"from": "gpt", "value": "Hi!"}


def test_conversation_extension_merges_random_rows():
    ds = Dataset.from_list(ROWS)
    single = to_sharegpt(ds)["conversations"]
    out = to_sharegpt(ds, conversation_extension=3, random_state=1)["conversations"]
    assert len(out) == 3 and all(len(c) == 6 for c in out)
    for i, conv in enumerate(out):
        assert conv[:2] == single[i]  # each row starts with its own exchange
        assert all(conv[k:k + 2] in single for k in (2, 4))  # then whole exchanges of other rows
    assert to_sharegpt(ds, conversation_extension=3, random_state=1)["conversations"] == out  # seeded


def test_missing_columns_are_named():
    ds = Dataset.from_list(ROWS)
    with pytest.raises(DataError, match="merged_prompt names the column 'question'.*'instruction', 'input', 'output'"):
        to_sharegpt(ds, merged_prompt="{question}")
    with pytest.raises(DataError, match="output_column_name names the column 'answer'"):
        to_sharegpt(ds, output_column_name="answer")
    with pytest.raises(DataError, match="Row 1 of the dataset: column 'output'"):
        to_sharegpt(Dataset.from_list([ROWS[0], {**ROWS[1], "output": None}]))


@pytest.mark.parametrize("kwargs, message", [
    ({"merged_prompt": "{instruction}[[{input}"}, "unmatched or nested"),
    ({"merged_prompt": "[[a [[{input}]]]]"}, "unmatched or nested"),
    ({"conversation_extension": 0}, "conversation_extension=0"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        to_sharegpt(Dataset.from_list(ROWS), **kwargs)
