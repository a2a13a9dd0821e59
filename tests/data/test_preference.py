"""Preference rows -> token ids: strings and TRL's conversational layout, truncation, and bad rows named."""
import pytest

from fasttune.data.preference import collate_pairs, tokenize_preference_rows, tokenize_unpaired_rows
from fasttune.errors import DataError


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_rows_get_eos_and_split_after_the_prompt(tiny_tokenizer):
    [ex] = tokenize_preference_rows([{"prompt": "Q?", "chosen": " yes", "rejected": " no"}], tiny_tokenizer,
                                    max_seq_length=64)
    eos = tiny_tokenizer.eos_token_id
    assert ex == {"prompt_ids": _ids(tiny_tokenizer, "Q?"), "chosen_ids": _ids(tiny_tokenizer, " yes") + [eos],
                  "rejected_ids": _ids(tiny_tokenizer, " no") + [eos]}


def test_conversational_rows_use_the_chat_template(tiny_tokenizer):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": "go away"}  # a string next to messages is an assistant message
    [ex] = tokenize_preference_rows([row], tiny_tokenizer, max_seq_length=64)
    assert ex["prompt_ids"] == _ids(tiny_tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ex["chosen_ids"] == _ids(tiny_tokenizer, "hello<|im_end|>\n")
    assert ex["rejected_ids"] == _ids(tiny_tokenizer, "go away<|im_end|>\n")


def test_truncation(tiny_tokenizer):
    rows = [{"prompt": "abcdefgh", "chosen": "12345", "rejected": "xy"}, {"prompt": "p" * 20, "chosen": "c",
                                                                          "rejected": "r"}]
    with pytest.warns(UserWarning, match="Dropped 1 of 2"):
        out = tokenize_preference_rows(rows, tiny_tokenizer, max_seq_length=10)
    assert len(out) == 1 and len(out[0]["prompt_ids"] + out[0]["chosen_ids"]) == 10
    [ex] = tokenize_preference_rows(rows[:1], tiny_tokenizer, max_seq_length=64, max_prompt_length=3)
    assert ex["prompt_ids"] == _ids(tiny_tokenizer, "fgh")  # the end of the prompt is kept


def test_collate_pairs_puts_chosen_first(tiny_tokenizer):
    ex = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}]
    b = collate_pairs(ex, 0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 4, 5, 6]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_kto_rows_and_paired_rows_unpaired(tiny_tokenizer):
    out = tokenize_unpaired_rows([{"prompt": "Q", "completion": "A", "label": False}], tiny_tokenizer,
                                 max_seq_length=64)
    assert out[0]["label"] is False
    out = tokenize_unpaired_rows([{"prompt": "Q", "chosen": "A", "rejected": "B"}], tiny_tokenizer, max_seq_length=64)
    assert [ex["label"] for ex in out] == [True, False]


GOOD = {"prompt": "Q", "chosen": "A", "rejected": "B"}


@pytest.mark.parametrize("bad, field", [
    ({"prompt": None}, "'prompt' is missing"),
    ({"chosen": 5}, "'chosen' must be a string"),
    ({"rejected": "  "}, "'rejected' is empty"),
    ({"chosen": []}, "'chosen' is an empty list"),
    ({"prompt": [{"role": "robot", "content": "x"}]}, "prompt[0] has the role 'robot'"),
    ({"chosen": [{"role": "user", "content": "x"}]}, "'chosen' has no assistant message"),
    ({"ref_chosen_logps": "x", "ref_rejected_logps": 1.0}, "'ref_chosen_logps' must be a finite number"),
])
def test_bad_rows_name_the_row_and_field(bad, field, tiny_tokenizer):
    rows = [dict(GOOD, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0)] * 2
    rows = [rows[0], {**rows[1], **bad}]
    with pytest.raises(DataError) as e:
        tokenize_preference_rows(rows, tiny_tokenizer, max_seq_length=64, source_name="p.jsonl")
    assert "Row 1 of p.jsonl" in str(e.value) and field in str(e.value)


def test_missing_columns_and_bad_labels(tiny_tokenizer):
    with pytest.raises(DataError, match="no column 'rejected'"):
        tokenize_preference_rows([{"prompt": "Q", "chosen": "A"}], tiny_tokenizer, max_seq_length=64)
    with pytest.raises(DataError, match="'ref_chosen_logps' but not 'ref_rejected_logps'"):
        tokenize_preference_rows([dict(GOOD, ref_chosen_logps=-1.0)], tiny_tokenizer, max_seq_length=64)
    with pytest.raises(DataError, match="Row 0 of the dataset: field 'label' must be true"):
        tokenize_unpaired_rows([{"prompt": "Q", "completion": "A", "label": 1}], tiny_tokenizer, max_seq_length=64)
