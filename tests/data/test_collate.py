import torch

from fasttune.data import collate, count_targets


def test_collate_right_pads():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_options():
    batch = collate([{"input_ids": [1, 2, 3]}], pad_token_id=None, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0]]


def test_count_targets_uses_the_causal_shift():
    labels = torch.tensor([[7, 8, -100, 9], [-100, -100, 4, -100]])
    # position 0 is never predicted: row 0 counts 8 and 9, row 1 counts 4
    assert count_targets(labels) == 3
    assert count_targets(torch.tensor([1, 2, 3])) == 2
    batch = collate([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4, 5], "labels": [-100, 4, 5]}], 0)
    assert count_targets(batch["labels"]) == 3
