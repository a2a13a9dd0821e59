"""Turn whatever the user passed as a dataset into a `datasets.Dataset` of rows.

Accepted: a `datasets.Dataset`, a `datasets.DatasetDict` (its "train" split), a list of dicts, a pandas
DataFrame, or a path to a .jsonl / .json / .csv / .parquet file or to a folder written by `save_to_disk`.
Hub ids are not supported yet: nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets

from fasttune.data.formats import require_dict_rows
from fasttune.errors import DataError

FILE_LOADERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
ACCEPTED_SOURCES = (
    "a JSON Lines file (.jsonl), a JSON file holding a list of objects (.json), a CSV file (.csv), "
    "a Parquet file (.parquet), a folder written by datasets' save_to_disk, a datasets.Dataset "
    "or a list of dicts"
)


def load_rows(source: Any) -> datasets.Dataset:
    """Return the rows of `source` as a `datasets.Dataset` (see the module docstring for what is accepted)."""
    if isinstance(source, datasets.Dataset):
        return _non_empty(source, "The dataset passed in")
    if isinstance(source, datasets.DatasetDict):
        return _train_split(source, "The DatasetDict passed in")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source).expanduser())
    if isinstance(source, (list, tuple)):
        return _from_list(list(source))
    if _is_dataframe(source):
        try:
            ds = datasets.Dataset.from_pandas(source, preserve_index=False)
        except Exception as e:  # pyarrow raises several unrelated types for unconvertible columns
            raise DataError(
                f"The DataFrame passed as the dataset could not be converted ({type(e).__name__}: {e}). "
                "Make every column hold one type (strings, numbers or lists of them)."
            ) from e
        return _non_empty(ds, "The DataFrame passed in")
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(
            "Streaming (Iterable) datasets are not supported yet. Load the dataset without streaming=True, "
            f"or pass {ACCEPTED_SOURCES}."
        )
    raise DataError(
        f"The dataset must be {ACCEPTED_SOURCES}; got an object of type {type(source).__name__}."
    )


def source_name(source: Any) -> str | None:
    """A short name for error messages ("data.jsonl"), or None when the source is not a path."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name or str(source)
    return None


def _non_empty(ds: datasets.Dataset, what: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"{what} has no rows. Pass a dataset with at least one training example.")
    return ds


def _train_split(dd: datasets.DatasetDict, what: str) -> datasets.Dataset:
    if "train" not in dd:
        raise DataError(
            f"{what} has no 'train' split (its splits are: {', '.join(map(repr, dd)) or 'none'}). "
            "Pass the split you want to train on directly, e.g. dataset['" + (next(iter(dd), "train")) + "']."
        )
    return _non_empty(dd["train"], f"The 'train' split of {what[0].lower()}{what[1:]}")


def _from_list(rows: list) -> datasets.Dataset:
    require_dict_rows(rows)
    try:
        return datasets.Dataset.from_list([dict(r) for r in rows])
    except Exception as e:  # pyarrow type-unification errors come in several classes
        raise DataError(
            f"The list of rows could not be turned into a dataset ({type(e).__name__}: {e}). "
            "Make each field hold the same type in every row (e.g. 'text' always a string)."
        ) from e


def _is_dataframe(obj: Any) -> bool:
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pandas")


def _load_path(path: Path) -> datasets.Dataset:
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        raise DataError(
            f"Dataset file not found: {path}. Check the path; accepted are {ACCEPTED_SOURCES}. "
            "(Hugging Face Hub dataset ids are not supported yet: download the data and pass the file.)"
        )
    if not path.is_file():
        raise DataError(f"{path} is not a regular file or folder. Pass {ACCEPTED_SOURCES}.")
    suffix = path.suffix.lower()
    if suffix not in FILE_LOADERS:
        raise DataError(
            f"Cannot read {path}: the extension '{path.suffix or '(none)'}' is not supported. "
            f"Accepted are {ACCEPTED_SOURCES}; rename or convert the file."
        )
    if path.stat().st_size == 0:
        raise DataError(f"Dataset file {path} is empty. Put at least one training example in it.")
    kind = FILE_LOADERS[suffix]
    loader = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
              "parquet": datasets.Dataset.from_parquet}[kind]
    try:
        with _quiet_datasets_logger():
            ds = loader(str(path))
    except Exception as e:  # the loaders raise StopIteration, ArrowInvalid, DatasetGenerationError, ...
        raise DataError(_unreadable_message(path, kind, e)) from e
    if not isinstance(ds, datasets.Dataset):  # from_* return a Dataset; guard against a dict of splits
        ds = _train_split(ds, f"Dataset file {path}")
    return _non_empty(ds, f"Dataset file {path}")


@contextmanager
def _quiet_datasets_logger():
    """datasets logs parse failures with a full traceback before raising; our DataError says it in one paragraph."""
    logger = logging.getLogger("datasets")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _load_folder(path: Path) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{path} is a folder but not a dataset written by datasets' save_to_disk ({e}). "
            f"Pass the data file inside it instead, or {ACCEPTED_SOURCES}."
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        return _train_split(loaded, f"The dataset folder {path}")
    return _non_empty(loaded, f"The dataset folder {path}")


def _unreadable_message(path: Path, kind: str, error: Exception) -> str:
    reason = str(error.__cause__ or error) or type(error).__name__
    if isinstance(error, StopIteration):
        reason = "no rows were found"
    if path.suffix.lower() == ".jsonl":
        bad = _first_bad_json_line(path)
        if bad is not None:
            line_no, msg = bad
            if line_no is None:
                return f"Cannot read {path}: {msg}. Save it as UTF-8 text."
            return (
                f"Cannot read {path}: line {line_no} is not valid JSON ({msg}). "
                "JSON Lines files need exactly one JSON object per line; fix or remove that line."
            )
    hint = {
        "json": "A .json file must hold a list of objects; a .jsonl file one JSON object per line.",
        "csv": "Check that the file is comma-separated with a header row.",
        "parquet": "Check that the file is a complete Parquet file (re-export it if it was truncated).",
    }[kind]
    return f"Cannot read {path} as {kind.upper()} ({reason[:300]}). {hint}"


def _first_bad_json_line(path: Path) -> tuple[int | None, str] | None:
    try:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return line_no, e.msg
                if not isinstance(value, dict):
                    return line_no, f"expected an object, found {type(value).__name__}"
    except UnicodeDecodeError as e:
        return None, f"the file is not UTF-8 text ({e})"
    return None
