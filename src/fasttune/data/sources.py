"""Turn whatever the user passed as a dataset into a `datasets.Dataset` of rows.

Accepted: a `datasets.Dataset`, a `datasets.DatasetDict` (its "train" split), a list of dicts, a pandas
DataFrame, a path to a .jsonl / .json / .csv / .parquet file or to a folder written by `save_to_disk`, or a
Hugging Face Hub dataset id ("org/name", its "train" split). A string is a hub id only when no such local path
exists and it has the id's shape; only then is the network used (by `datasets.load_dataset`, with its cache).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import pyarrow as pa

from fasttune.data.formats import require_dict_rows
from fasttune.errors import DataError
from fasttune.data.paths import ACCEPTED_SOURCES, FILE_LOADERS, check_local_source, looks_like_hub_id
from fasttune.file_readers import check_utf8

def load_rows(source: Any) -> datasets.Dataset:
    """Return the rows of `source` as a `datasets.Dataset` (see the module docstring for what is accepted)."""
    if isinstance(source, datasets.Dataset):
        return _non_empty(source, "The dataset passed in")
    if isinstance(source, datasets.DatasetDict):
        return _train_split(source, "The DatasetDict passed in")
    if isinstance(source, str) and looks_like_hub_id(source):
        return load_hub_rows(source)
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


def load_hub_rows(dataset_id: str) -> datasets.Dataset:
    """The "train" split of a hub dataset, through datasets' download cache (which also serves offline mode)."""
    offline_env = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_true(k)]
    # datasets reads the offline switch at import: if it was set later, datasets would still go online.
    if offline_env and not datasets.config.HF_HUB_OFFLINE:
        raise DataError(_hub_unreachable(dataset_id, f"{' and '.join(offline_env)} is set"))
    if not datasets.config.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable_reason()
        if unreachable:  # fail now rather than after huggingface_hub's ~25 s of retries
            raise DataError(_hub_unreachable(dataset_id, unreachable))
    try:
        with _quiet_datasets_logger():
            ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # network, not-found, gated, missing split and parse errors all arrive here
        raise DataError(_hub_error_message(dataset_id, e)) from e
    return _non_empty(ds, f"The 'train' split of the hub dataset {dataset_id}")


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
    check_local_source(path)
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
    if kind in ("json", "csv"):  # the loaders would fail later (or mid-training) with a decoder traceback
        check_utf8(path, DataError)
    loader = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
              "parquet": datasets.Dataset.from_parquet}[kind]
    try:
        with _quiet_datasets_logger():
            ds = loader(str(path), **(_csv_as_text(path) if kind == "csv" else {}))
            if kind == "csv":
                ds = _typed_csv_columns(ds)
    except Exception as e:  # the loaders raise StopIteration, ArrowInvalid, DatasetGenerationError, ...
        raise DataError(_unreadable_message(path, kind, e)) from e
    if not isinstance(ds, datasets.Dataset):  # from_* return a Dataset; guard against a dict of splits
        ds = _train_split(ds, f"Dataset file {path}")
    return _non_empty(ds, f"Dataset file {path}")


def _csv_as_text(path: Path) -> dict:
    """from_csv options that keep every cell as the text in the file, as Python's csv module reads it: no number
    or NA inference (`02139` stays `02139`, `NA`/`None` stay words, an empty cell is "")."""
    import pandas as pd

    columns = pd.read_csv(path, nrows=0).columns  # the names pandas gives the header (duplicates renamed)
    return {"features": datasets.Features({str(c): datasets.Value("string") for c in columns}),
            "keep_default_na": False, "na_filter": False}


# The only CSV columns that are not text: KTO's boolean `label` and DPO's precomputed reference log-probs.
CSV_TYPED_COLUMNS = {"label": datasets.Value("bool"), "ref_chosen_logps": datasets.Value("float64"),
                     "ref_rejected_logps": datasets.Value("float64")}


def _typed_csv_columns(ds: datasets.Dataset) -> datasets.Dataset:
    """`label` as booleans when every cell is true/false (any case), the log-prob columns as numbers when every
    cell is one; otherwise they stay text, and the preference reader names the bad cell."""
    for name, feature in CSV_TYPED_COLUMNS.items():
        if name not in ds.column_names:
            continue
        if feature.dtype == "bool" and not all(v.lower() in ("true", "false") for v in ds[name]):
            continue
        try:
            ds = ds.cast_column(name, feature)  # Arrow's cast: true/false in any case, numbers as written
        except (ValueError, TypeError, pa.ArrowInvalid):
            pass
    return ds


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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable_reason() -> str | None:
    """Why the hub's host cannot be reached (no DNS, no route), or None if it can or a proxy decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return f"no network: cannot connect to {host}:{port}: {e.strerror or e}"
    return None


def _download_hint(dataset_id: str) -> str:
    return (
        "To use it without network, download it once on a machine that has network: "
        f"`python -c \"import datasets; datasets.load_dataset('{dataset_id}', split='train')"
        f".save_to_disk('{dataset_id.split('/')[-1]}')\"` and pass that folder (or a .jsonl/.parquet file) instead."
    )


def _hub_unreachable(dataset_id: str, why: str, *, cache_checked: bool = False) -> str:
    cache = ("datasets' cache does not hold it either" if cache_checked else
             "if an earlier run downloaded it, set HF_HUB_OFFLINE=1 (before starting Python) to use datasets' cache")
    return (
        f"'{dataset_id}' is not a local file or folder, and it looks like a Hugging Face Hub dataset id, but the "
        f"hub cannot be reached ({why}); {cache}. Check the path if you meant a local file. "
        f"{_download_hint(dataset_id)}"
    )


def _hub_error_message(dataset_id: str, error: Exception) -> str:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    name = type(error).__name__
    chain = [error, error.__cause__, error.__context__]
    if datasets.config.HF_HUB_OFFLINE or any(
        type(e).__name__ in ("ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout",
                             "OfflineModeIsEnabled", "LocalEntryNotFoundError", "gaierror")
        for e in chain if e is not None
    ):
        if datasets.config.HF_HUB_OFFLINE:
            return _hub_unreachable(dataset_id, "offline mode is on", cache_checked=True)
        return _hub_unreachable(dataset_id, f"no network: {reason}")
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError"):
        return (
            f"'{dataset_id}' is not a local file or folder, and the Hugging Face Hub has no dataset by that id that "
            f"you can access ({reason}). Check the spelling; for a private or gated dataset, log in with "
            "`hf auth login` and accept its terms on its hub page."
        )
    if "split" in str(error).lower() and "train" in str(error):
        return (
            f"The hub dataset '{dataset_id}' has no 'train' split ({reason}). Load the split you want with "
            f"datasets.load_dataset('{dataset_id}', split=...) and pass the Dataset."
        )
    return f"The hub dataset '{dataset_id}' could not be loaded ({reason}). {_download_hint(dataset_id)}"
