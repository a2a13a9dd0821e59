"""Tokenized SFT examples kept in Arrow: a read-only sequence of {"input_ids": [...], "labels": [...]} dicts.

Python lists cost ~84 bytes a token (ids + labels, measured); the int32 Arrow columns cost 8. Each access
builds the dict of lists that the trainer, packer and collator read, so they need no change.
"""
from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from itertools import accumulate

import numpy as np
import pyarrow as pa


class TokenizedExamples(Sequence):
    """A read-only sequence over two Arrow list<int32> columns of one table (input_ids, labels, chunked alike): item i
    is {"input_ids": list[int], "labels": list[int]} built on access; negative indices and slices work as on a list; an
    out-of-range index raises IndexError. Compares equal to any sequence of the same dicts."""

    def __init__(self, input_ids: pa.ChunkedArray, labels: pa.ChunkedArray):
        # Per chunk, numpy views of the offsets and the flat values (zero-copy): a row is values[o[j]:o[j + 1]],
        # ~10x faster to read than through pyarrow scalars. Chunks are not combined: that could overflow a list
        # array's int32 offsets (2^31 tokens).
        chunks = [c for c in input_ids.chunks if len(c)]
        self._starts = list(accumulate((len(c) for c in chunks), initial=0))
        self._ids = [_flat(c) for c in chunks]
        # Labels chunked like the ids (they are when both come from one table; slicing is then zero-copy).
        self._labels = [_flat(labels.slice(s, len(c)).combine_chunks()) for s, c in zip(self._starts, chunks)]

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
        (io, iv), (lo, lv) = self._ids[chunk], self._labels[chunk]
        return {"input_ids": iv[io[j]:io[j + 1]].tolist(), "labels": lv[lo[j]:lo[j + 1]].tolist()}

    def __eq__(self, other):
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking sequence semantics, like list

    def __repr__(self) -> str:
        return f"TokenizedExamples({len(self)} examples)"


def _flat(chunk: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    # `offsets` honours a sliced chunk's offset and `values` ignores it, so together they address the right rows.
    return chunk.offsets.to_numpy(), chunk.values.to_numpy()
