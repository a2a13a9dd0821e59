"""Atomic folder writes: build into a temporary sibling, rename into place only when complete."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fasttune.errors import write_error


@contextmanager
def atomic_folder(final: Path, what: str):
    """Yields a temporary folder; on success it replaces `final`, on any error it is removed (no partial output)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise write_error(e, what, final) from None
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, what, final) from None
        raise
