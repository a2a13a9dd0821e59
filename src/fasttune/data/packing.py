"""Padding-free packing: short examples share rows, attention never crosses a document, no label does either.

`pack_examples` fills rows of `capacity` tokens best-fit-decreasing (each example, longest first, goes into the
fullest row it still fits). Each packed row carries `position_ids` that restart at 0 per document (RoPE sees
every document from position 0, as unpacked) and `segment_ids` (1, 2, ... per document) from which the model
builds a block-diagonal causal mask. The first token of every document gets label -100, so the last token of
one document is never trained to predict the next document. Vision-language examples (data/vision_rows.py) carry
their media too: a packed row holds its documents' images, audio clips and videos in document order, and
`image_rows`, each document's image count (LLaVA-OneVision tiles only the images of rows that hold one).
"""
from __future__ import annotations

import bisect

from fasttune.constants import IGNORE_INDEX


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Pack examples ({"input_ids", optional "labels"} lists) into rows of at most `capacity` tokens,
    best-fit-decreasing; an example longer than capacity gets a row of its own (truncation is the encoder's job).
    Returns one unpadded dict per row with input_ids, labels (each document's first label -100), position_ids (0.. per
    document) and segment_ids (1, 2, ... per document), all list[int] of the row's length."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    free: list[tuple[int, int]] = []  # (free tokens, row index), kept sorted: best fit = first that fits
    rows: list[list[int]] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return [_join([examples[i] for i in members]) for members in rows]


MEDIA = ("images", "audio", "videos")  # a vision-language example's media lists (data/vision_rows.py)


def _join(docs: list[dict]) -> dict:
    out = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    for seg, doc in enumerate(docs, 1):
        ids = list(doc["input_ids"])
        labels = list(doc.get("labels") or ids)
        labels[0] = IGNORE_INDEX
        out["input_ids"] += ids
        out["labels"] += labels
        out["position_ids"] += list(range(len(ids)))
        out["segment_ids"] += [seg] * len(ids)
    for key in MEDIA:
        if any(key in doc for doc in docs):
            out[key] = [m for doc in docs for m in doc.get(key, ())]
    if "images" in out:
        out["image_rows"] = [n for doc in docs for n in doc.get("image_rows", [len(doc.get("images", ()))])]
    return out
