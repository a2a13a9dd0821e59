"""Atomic folder writes: build into a temporary sibling, rename into place only when complete."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fasttune.errors import write_error


@contextmanager
def atomic_folder(final: Path, what: str, replace: bool = False):
    """Yields a temporary folder; on success its files move into `final` (created, or an existing folder whose
    same-named entries are replaced and whose other entries, such as a trainer's checkpoint folders, are kept);
    on any error it is removed (no partial output). replace=True swaps the whole folder instead."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise write_error(e, what, final) from None
    try:
        yield tmp
        if final.is_dir() and not replace:
            _move_entries(tmp, final)
        elif final.is_dir():
            shutil.rmtree(final)
            tmp.rename(final)
        else:
            if final.exists():
                final.unlink()
            tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, what, final) from None
        raise


def _move_entries(src: Path, dest: Path):
    for entry in src.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        entry.replace(target)
    src.rmdir()
