"""User-facing errors. Every error a user can cause is a FastTuneError with one actionable paragraph."""
import errno
import os
import re


class FastTuneError(Exception):
    """Base class: the CLI prints the message without a traceback and exits non-zero."""


class ModelLoadError(FastTuneError):
    """A model path, checkpoint or architecture that cannot be loaded."""


class DataError(FastTuneError):
    """A dataset file, row or field that cannot be used."""


class ConfigError(FastTuneError):
    """A training/LoRA option that is invalid or unsupported."""


class WriteError(ConfigError):
    """A failed save (disk full, no permission, ...); `os_error` is the cause."""

    def __init__(self, message: str, os_error: OSError):
        super().__init__(message)
        self.os_error = os_error


def write_error(e: OSError, what: str, where, kept: str = "") -> WriteError:
    """An OSError while saving, as advice: disk full, no permission, or the system's own words. kept: a sentence
    on what is still complete (a checkpoint save: "Earlier checkpoints are intact."), appended to the message."""
    if e.errno == errno.ENOSPC:
        msg = (f"The disk is full: could not write {what} to '{where}'. Free some space or choose another output "
               f"location.")
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = f"No permission to write {what} to '{where}'. Choose a location you can write to."
    elif e.errno is None and (short := re.search(r"(\d+) requested and (\d+) written", str(e))):
        # numpy's tofile (gguf's writer) reports a short write without an errno: the disk or a size limit
        msg = (f"Could not write {what} to '{where}': only {short.group(2)} of {short.group(1)} bytes were "
               f"written (the disk is full or a file-size limit was reached). Free some space or choose another "
               f"output location.")
    else:
        msg = f"Could not write {what} to '{where}': {e.strerror or e}."
    return WriteError(f"{msg} {kept}" if kept else msg, e)


def os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None. Writers that wrap it: the Rust libraries, whose errors end in
    Rust's "(os error 28)" (safetensors' SafetensorError, tokenizers' plain Exception from
    `tokenizer.save_pretrained`), and torch.save's RuntimeError to an open file (the OSError is its
    __context__)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        found = None if isinstance(seen, FastTuneError) else re.search(r"\(os error (\d+)\)", str(seen))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__context__
    return None


def refuse_unknown(method: str, kwargs: dict, accepted: tuple = ()) -> None:
    """Raise ConfigError naming the keyword arguments of `method` outside `accepted` (a typo must not be dropped
    silently)."""
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ConfigError(f"{method}() got unknown argument(s) {unknown}. Check the spelling; see the method's "
                          f"docstring for what it takes.")
