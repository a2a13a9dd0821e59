"""Rows -> tokenized SFT examples: {"input_ids": [...], "labels": [...]} with -100 where there is no loss.

Datasets (files, `save_to_disk` folders, `datasets.Dataset`) are tokenized with `datasets.Dataset.map`: once,
with datasets' progress bar, in `num_proc` processes for big data, and cached next to the dataset's Arrow files
under a fingerprint of the rows + tokenizer + every setting (see fasttune.data.encode.SFTEncoder), so a second run
on the same data reuses the result. A list of dicts is tokenized in this process without a cache unless it is big.
What each layout turns into is defined in fasttune.data.encode.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from fasttune.data import formats
from fasttune.data.encode import (BOS_IN_TEXT, IGNORE_INDEX, NO_RESPONSE, NO_TARGET, TEMPLATE_COLUMNS, TOO_LONG,
                                  TRUNCATED, SFTEncoder)
from fasttune.data.examples import TokenizedExamples
from fasttune.data.sources import load_rows, source_name as _source_name
from fasttune.errors import ConfigError, DataError

__all__ = ["tokenize_rows", "resolve_num_proc", "IGNORE_INDEX"]

PROGRESS_MIN_ROWS = 1000
MULTIPROCESS_MIN_ROWS = 10_000  # below this, starting worker processes costs more than it saves
MAX_AUTO_PROCS = 8
MAP_BATCH_SIZE = 1000
FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "fate": datasets.Value("int8"),
})

logger = logging.getLogger("fasttune.data")


def resolve_num_proc(num_proc: int | None, n_rows: int) -> int:
    """Processes for tokenizing `n_rows` rows: `num_proc` as given, or None = 1 below MULTIPROCESS_MIN_ROWS rows,
    else min(8, cpu count)."""
    if num_proc is None:
        return 1 if n_rows < MULTIPROCESS_MIN_ROWS else max(1, min(MAX_AUTO_PROCS, os.cpu_count() or 1))
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ConfigError(f"dataset_num_proc={num_proc!r} is invalid: use a whole number >= 1, or None for auto.")
    return min(num_proc, n_rows)


def tokenize_rows(
    rows: Any,
    tokenizer: Any,
    *,
    max_seq_length: int,
    data_format: str = "auto",
    dataset_text_field: str = "text",
    train_on_responses_only: bool = False,
    source_name: str | None = None,
    chat_template: str | None = None,
    drop_long: bool = False,
    num_proc: int | None = None,
    completion_only_loss: bool | None = None,
) -> Sequence[dict[str, list[int]]]:
    """Tokenize every row; return examples with equal-length `input_ids` and `labels`: a list for a list of rows,
    else a TokenizedExamples (the same dicts, read from Arrow columns on access).

    `rows` is a datasets.Dataset, a list of dicts, or anything `load_rows` accepts (a path names itself in
    error messages; otherwise pass `source_name`). Examples are truncated to `max_seq_length`; examples left
    without any target token (after the causal shift) are dropped with one warning. `drop_long=True` drops
    examples longer than `max_seq_length` instead of truncating them (counted, one warning).
    `chat_template` (a name from fasttune.data.templates.CHAT_TEMPLATES or a Jinja string) renders chat rows
    instead of the tokenizer's own template. `num_proc`: tokenizing processes (None: see `resolve_num_proc`).
    `completion_only_loss` (TRL's): prompt/completion rows train on the completion only unless it is False.
    """
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}.")
    if isinstance(rows, (str, os.PathLike)):
        source_name = source_name or _source_name(rows)
    if not isinstance(rows, (datasets.Dataset, list)):
        rows = load_rows(rows)
    if isinstance(rows, list):
        formats.require_dict_rows(rows, source_name)
        columns = list(dict.fromkeys(k for row in rows for k in row))
    else:
        if len(rows) == 0:
            raise DataError(f"{source_name or 'The dataset'} has no rows. Pass at least one training example.")
        columns = rows.column_names
    procs = resolve_num_proc(num_proc, len(rows))

    fmt = formats.detect_format(
        columns, data_format, dataset_text_field=dataset_text_field, source_name=source_name
    )
    encoder = SFTEncoder(tokenizer, fmt, dataset_text_field, train_on_responses_only, source_name, chat_template,
                         max_seq_length=max_seq_length, drop_long=drop_long, completion_only=completion_only_loss)
    keep = formats.required_columns(fmt, dataset_text_field) + formats.OPTIONAL_COLUMNS.get(fmt, ())
    _name_ignored(columns, keep, fmt, encoder, source_name or "the dataset")
    if isinstance(rows, list) and procs > 1:
        rows = _list_to_dataset(rows)  # worker processes need Arrow shards; stays a list if it cannot convert
    if isinstance(rows, list):
        input_ids, labels, fates = _encode_in_process(rows, encoder)
        _report(fates, len(fates), source_name or "the dataset", max_seq_length, train_on_responses_only)
        _say_bos(fates, source_name or "the dataset", encoder.bos_text)
        return [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels)]
    rows = rows.select_columns([c for c in keep if c in columns])  # read only the columns the layout uses
    examples, fates = _encode_with_map(rows, encoder, procs)
    _report(fates, len(fates), source_name or "the dataset", max_seq_length, train_on_responses_only)
    _say_bos(fates, source_name or "the dataset", encoder.bos_text)
    return examples


def _name_ignored(columns: list, keep: tuple, fmt: str, encoder: SFTEncoder, where: str) -> None:
    """One log line naming the columns that do not reach the tokens (also tools/documents the template never
    reads)."""
    ignored = [repr(c) for c in columns if c not in keep]
    ignored += [f"{c!r} (the chat template does not use it)" for c in TEMPLATE_COLUMNS
                if c in columns and c in keep and not encoder.template_reads(c)]
    if ignored:
        logger.warning("Columns of %s not used for '%s' rows: %s.", where, fmt, ", ".join(ignored))


def _say_bos(fates: np.ndarray, where: str, bos: str | None) -> None:
    count = int(np.count_nonzero(fates & BOS_IN_TEXT))
    if count:
        logger.warning("%d of %d rows of %s already start with the BOS token %r (text rendered with the chat "
                       "template): no second BOS was added.", count, len(fates), where, bos)


def _encode_in_process(rows: list, encoder: SFTEncoder) -> tuple[list, list, np.ndarray]:
    input_ids, labels, fates = [], [], []
    bar = tqdm(rows, total=len(rows), desc="Tokenizing", unit="row", disable=len(rows) <= PROGRESS_MIN_ROWS)
    for i, row in enumerate(bar):
        ids, labs, fate = encoder.fit_row(row, i)
        fates.append(fate)
        if not fate & (NO_TARGET | TOO_LONG):
            input_ids.append(ids)
            labels.append(labs)
    return input_ids, labels, np.asarray(fates, dtype=np.int8)


def _encode_with_map(ds: datasets.Dataset, encoder: SFTEncoder, procs: int) -> tuple[TokenizedExamples, np.ndarray]:
    # Batched: one Python call per MAP_BATCH_SIZE rows instead of per row (datasets' per-call overhead), with the
    # same per-row encoding, so a bad row still raises its own DataError (from a worker too: datasets re-raises
    # it in this process).
    with _progress_bars(len(ds) > PROGRESS_MIN_ROWS):
        out = ds.map(encoder, batched=True, batch_size=MAP_BATCH_SIZE, with_indices=True,
                     remove_columns=ds.column_names, features=FEATURES, num_proc=procs if procs > 1 else None,
                     desc="Tokenizing")
    table = out.data
    fates = table.column("fate").to_numpy()
    kept = (fates & (NO_TARGET | TOO_LONG)) == 0
    input_ids, labels = table.column("input_ids"), table.column("labels")
    if not kept.all():
        input_ids, labels = pc.filter(input_ids, kept), pc.filter(labels, kept)
    return TokenizedExamples(input_ids, labels), fates


def _list_to_dataset(rows: list) -> datasets.Dataset | list:
    try:
        return datasets.Dataset.from_list([dict(r) for r in rows])
    except Exception:  # mixed types in a column: the in-process path reports the first bad row by its index
        return rows


@contextmanager
def _progress_bars(show: bool):
    """datasets' bar is global state: hide it for small datasets (as the in-process bar does), then restore."""
    was_disabled = datasets.are_progress_bars_disabled()
    with warnings.catch_warnings():  # datasets warns when HF_DATASETS_DISABLE_PROGRESS_BARS overrides us
        warnings.simplefilter("ignore")
        if not show and not was_disabled:
            datasets.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not show and not was_disabled:
                datasets.enable_progress_bars()


def _all_rows(n: int, many: str, one: str, which: str = "") -> str:
    """'all 3 rows are' / 'its only row is' (with `which`: 'all 3 rows left are')."""
    which = f" {which}" if which else ""
    return f"all {n} rows{which} {many}" if n != 1 else f"its only row{which} {one}"


def _report(fates: np.ndarray, n: int, where: str, max_seq_length: int, responses_only: bool) -> None:
    """One log line for truncated rows, one warning per kind of dropped rows, an error if none is left."""
    truncated = int(np.count_nonzero(fates & TRUNCATED))
    dropped = int(np.count_nonzero(fates & NO_TARGET))
    too_long = int(np.count_nonzero(fates & TOO_LONG))
    if truncated:
        logger.warning(
            "%d of %d rows of %s are longer than max_seq_length=%d tokens and were truncated.",
            truncated, n, where, max_seq_length,
        )
    if too_long == n:
        raise DataError(
            f"No training example is left in {where}: {_all_rows(n, 'are', 'is')} longer than max_seq_length="
            f"{max_seq_length} tokens and drop_long is on. Raise max_seq_length, or turn drop_long off to "
            "truncate long rows instead."
        )
    if dropped + too_long == n:
        raise DataError(
            f"No usable training example is left in {where}: {_all_rows(n, 'have', 'has')} no target token"
            f" after truncation to max_seq_length={max_seq_length}"
            + (" with train_on_responses_only (the prompts fill the whole window)" if responses_only else "")
            + ". Raise max_seq_length, shorten the prompts, or check that rows contain responses."
        )
    promptonly = int(np.count_nonzero(fates & NO_RESPONSE))
    kept = n - dropped - too_long
    if promptonly and promptonly == kept:
        raise DataError(
            f"max_seq_length={max_seq_length} cuts off every response in {where}: "
            f"{_all_rows(kept, 'are', 'is', 'left')} truncated before the first response token, so training would only teach the prompts. Raise "
            "max_seq_length above the prompts' length."
        )
    if promptonly:
        warnings.warn(
            f"{promptonly} of {n} rows of {where} are truncated to max_seq_length={max_seq_length} before their "
            "response starts; they teach only their prompt. Raise max_seq_length to keep their responses.",
            UserWarning,
            stacklevel=3,
        )
    if too_long:
        warnings.warn(
            f"Dropped {too_long} of {n} rows of {where} that are longer than max_seq_length={max_seq_length} "
            "tokens (drop_long); turn drop_long off to truncate them instead.",
            UserWarning,
            stacklevel=3,
        )
    if dropped:
        warnings.warn(
            f"Dropped {dropped} of {n} rows of {where} that have no target token after truncation to "
            f"max_seq_length={max_seq_length}; raise max_seq_length to keep them.",
            UserWarning,
            stacklevel=3,
        )
