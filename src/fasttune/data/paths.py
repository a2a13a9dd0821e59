"""What a dataset argument names (a local file or folder, or a hub id), decided without importing `datasets`, so
that the command line can refuse a wrong path before its slow imports."""
from __future__ import annotations

import re
from pathlib import Path

from fasttune.errors import DataError

FILE_LOADERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
ACCEPTED_SOURCES = (
    "a JSON Lines file (.jsonl), a JSON file holding a list of objects (.json), a CSV file (.csv), "
    "a Parquet file (.parquet), a folder written by datasets' save_to_disk, a Hugging Face Hub dataset id "
    "(org/name), a datasets.Dataset or a list of dicts"
)
# "org/name" as the hub spells repository ids; "./x/y", "/x/y", "a/b/c" or "x/y.jsonl" are local paths.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(source: str) -> bool:
    """True for "org/name" strings that name no existing local path (a local path always wins)."""
    return (
        HUB_ID.fullmatch(source) is not None
        and Path(source).suffix.lower() not in FILE_LOADERS
        and not Path(source).expanduser().exists()
    )


def check_local_source(source) -> None:
    """Raise DataError when `source` (a str or path) names a local file that does not exist. Hub ids and objects
    pass (load_rows decides about them)."""
    if not isinstance(source, (str, Path)) or (isinstance(source, str) and looks_like_hub_id(source)):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"Dataset file not found: {path}. Check the path; accepted are {ACCEPTED_SOURCES}.")


def refuse_address(value, where: str, kind: str) -> None:
    """DataError naming `where` when `value` is a web address (fasttune downloads nothing while it runs)."""
    if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
        raise DataError(f"{where}: '{value}' is a web address; fasttune downloads nothing while it runs. Download the "
                        f"{kind} and pass its file path instead.")
