"""Atomic folder writes: build into a temporary sibling, rename into place only when complete."""
from __future__ import annotations

import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from fasttune.errors import FastTuneError, WriteError, os_error_of, write_error


def tmp_prefix(name: str) -> str:
    """The hidden prefix of `name`'s temporary siblings (`.checkpoint-8.tmp-1a2b3c4d`)."""
    return f".{name}.tmp-"


def remove_leftovers(folder: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Delete temporary folders/files a killed save left in `folder` (names matching `pattern`); returns them."""
    folder = Path(folder)
    gone = sorted(folder.glob(pattern)) if folder.is_dir() else []
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


@contextmanager
def atomic_folder(final: Path, what: str, replace: bool = False, kept: str = ""):
    """Yields a temporary folder; on success its files move into `final` (created, or an existing folder whose
    same-named entries are replaced and whose other entries, such as a trainer's checkpoint folders, are kept);
    on any error it is removed (no partial output). replace=True swaps the whole folder instead.

    The folder gets the permissions a plain mkdir gives under the current umask (not mkdtemp's 0700). Leftovers
    of an earlier save of the same `final` that was killed are removed first. A failed write (disk full, no
    permission; also when wrapped by safetensors or torch.save) raises WriteError (a ConfigError) via `write_error`,
    whose message ends with `kept` (what is still complete)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(final.parent, tmp_prefix(final.name) + "*")
        tmp = final.parent / (tmp_prefix(final.name) + secrets.token_hex(4))
        tmp.mkdir()
    except OSError as e:
        raise write_error(e, what, final, kept) from None
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
        if isinstance(e, WriteError):  # a nested save (a checkpoint's adapter): report the outer folder
            raise write_error(e.os_error, what, final, kept) from None
        cause = os_error_of(e) if isinstance(e, Exception) and not isinstance(e, FastTuneError) else None
        if cause is not None:
            raise write_error(cause, what, final, kept) from None
        raise


def _move_entries(src: Path, dest: Path):
    for entry in src.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        entry.replace(target)
    src.rmdir()
