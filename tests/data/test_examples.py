"""TokenizedExamples: Arrow-backed examples behave like the list of dicts the trainer, packer and collator read."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from fasttune.data import collate
from fasttune.data.examples import TokenizedExamples
from fasttune.data.packing import pack_examples

IDS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
LABELS = [[-100, 2, 3], [4, 5], [6], [-100, -100, 9, 10]]
LIST = [{"input_ids": i, "labels": lab} for i, lab in zip(IDS, LABELS)]


def arrow(rows, chunks):
    arrays = [pa.array(rows[a:b], type=pa.list_(pa.int32())) for a, b in zip(chunks, chunks[1:])]
    return pa.chunked_array(arrays, type=pa.list_(pa.int32()))


@pytest.mark.parametrize("ids_chunks, label_chunks", [([0, 4], [0, 4]), ([0, 1, 1, 3, 4], [0, 2, 4])])
def test_behaves_like_the_list(ids_chunks, label_chunks):
    ex = TokenizedExamples(arrow(IDS, ids_chunks), arrow(LABELS, label_chunks))
    assert len(ex) == 4 and ex == LIST and LIST == ex and list(ex) == LIST
    assert ex[-1] == LIST[-1] and ex[np.int64(2)] == LIST[2] and ex[torch.tensor(1)] == LIST[1]
    assert ex[1:3] == LIST[1:3] and ex[::-2] == LIST[::-2]
    assert ex != LIST[:3] and bool(ex)
    with pytest.raises(IndexError):
        ex[4]
    ex[0]["input_ids"].append(99)  # each access is a fresh copy
    assert ex[0] == LIST[0]


def test_packer_and_collator_accept_it():
    ex = TokenizedExamples(arrow(IDS, [0, 2, 4]), arrow(LABELS, [0, 2, 4]))
    assert pack_examples(ex, 5) == pack_examples(LIST, 5)
    for a, b in zip(collate(ex[:3], 0).values(), collate(LIST[:3], 0).values()):
        assert torch.equal(a, b)
