"""Labelled rows for classifiers (data/classification.py): the head a dataset asks for, labels checked against a
head, batches."""
import pytest
import torch
from transformers import LlamaConfig

from fasttune.data.classification import collate_classification, label_space, tokenize_classification_rows
from fasttune.errors import DataError


@pytest.mark.parametrize("labels, want", [
    ([0, 2, 1], {"num_labels": 3, "id2label": None, "problem_type": "single_label_classification"}),
    (["spam", "ham", "spam"], {"num_labels": 2, "id2label": {0: "ham", 1: "spam"},
                               "problem_type": "single_label_classification"}),
    ([0.5, 3.0], {"num_labels": 1, "id2label": None, "problem_type": "regression"}),
    ([[1, 0, 1], [0, 0, 1]], {"num_labels": 3, "id2label": None, "problem_type": "multi_label_classification"}),
])
def test_label_space(labels, want):
    assert label_space([{"text": "x", "label": v} for v in labels]) == want


@pytest.mark.parametrize("labels, message", [
    ([0, "a"], "mixes class indices and class names"), ([0, 0.5], "mixes kinds"), ([-1, 1], "class index -1"),
    ([[1, 0], [1]], "lengths"), (["a", "a"], "two classes"), ([0, True], "True"), ([0, None], "None"),
])
def test_label_space_refusals(labels, message):
    with pytest.raises(DataError, match=message):
        label_space([{"text": "x", "label": v} for v in labels])


def _config(n, **kw):
    c = LlamaConfig(num_labels=n)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_rows_become_ids_and_checked_labels(tiny_tokenizer):
    """Names map through label2id; a chat row renders whole; long rows keep their start or are dropped; labels
    that do not fit the head are named by row."""
    cfg = _config(2, label2id={"ham": 0, "spam": 1})
    rows = [{"text": "hello there", "label": "spam"}, {"messages": [{"role": "user", "content": "hi"}], "label": "ham"}]
    out = tokenize_classification_rows(rows, tiny_tokenizer, cfg, max_seq_length=8)
    assert [ex["label"] for ex in out] == [1, 0]
    assert out[0]["input_ids"] == tiny_tokenizer("hello there")["input_ids"][:8]
    assert tiny_tokenizer.decode(out[1]["input_ids"]).startswith("<|im_start|>user")
    with pytest.warns(UserWarning, match="Dropped 1 of 2"):
        kept = tokenize_classification_rows(rows, tiny_tokenizer, cfg, max_seq_length=10, drop_long=True)
    assert len(kept) == 1
    for label, message in (("eggs", "class name 'eggs'.*'ham', 'spam'"), (2, "class index 2"),
                           (0.5, "regression needs num_labels=1"), ([1, 0, 1], "lists 3 values")):
        with pytest.raises(DataError, match=f"Row 1 of the dataset: 'label' .*{message}"):
            tokenize_classification_rows([rows[0], {"text": "x", "label": label}], tiny_tokenizer, cfg,
                                         max_seq_length=8)
    with pytest.raises(DataError, match="Row 0 of the dataset has no 'label'"):
        tokenize_classification_rows([{"text": "x"}], tiny_tokenizer, cfg, max_seq_length=8)


def test_collate():
    batch = collate_classification([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["labels"].dtype == torch.long
    floats = collate_classification([{"input_ids": [5], "label": [1.0, 0.0]}], pad_id=0)
    assert floats["labels"].dtype == torch.float32 and floats["labels"].shape == (1, 2)
