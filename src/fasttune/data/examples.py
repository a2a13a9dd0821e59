"""Tokenized SFT examples kept in Arrow: a read-only sequence of {"input_ids": [...], "labels": [...]} dicts.

Python lists cost ~84 bytes a token (ids + labels, measured); the int32 Arrow columns cost 8. Each access
builds the dict of lists that the trainer, packer and collator read, so they need no change.
"""
from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from itertools import accumulate

import pyarrow as pa


class TokenizedExamples(Sequence):
    def __init__(self, input_ids: pa.ChunkedArray, labels: pa.ChunkedArray):
        # Chunks are kept as they are: combining them could overflow a list array's int32 offsets (2^31 tokens).
        self._ids = [c for c in input_ids.chunks if len(c)]
        self._starts = list(accumulate((len(c) for c in self._ids), initial=0))
        # Labels chunked like the ids (they are when both come from one table; slicing is then zero-copy).
        self._labels = [labels.slice(s, len(c)).combine_chunks() for s, c in zip(self._starts, self._ids)]

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)  # also numpy / torch integers
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example index {index} out of range for {len(self)} examples")
        chunk = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[chunk]
        return {"input_ids": self._ids[chunk][j].values.to_pylist(),
                "labels": self._labels[chunk][j].values.to_pylist()}

    def __eq__(self, other):
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking sequence semantics, like list

    def __repr__(self) -> str:
        return f"TokenizedExamples({len(self)} examples)"
