"""User-facing errors. Every error a user can cause is a FastTuneError with one actionable paragraph."""
import errno


class FastTuneError(Exception):
    """Base class: the CLI prints the message without a traceback and exits non-zero."""


class ModelLoadError(FastTuneError):
    """A model path, checkpoint or architecture that cannot be loaded."""


class DataError(FastTuneError):
    """A dataset file, row or field that cannot be used."""


class ConfigError(FastTuneError):
    """A training/LoRA option that is invalid or unsupported."""


def write_error(e: OSError, what: str, where) -> ConfigError:
    """An OSError while saving, as advice: disk full, no permission, or the system's own words."""
    if e.errno == errno.ENOSPC:
        return ConfigError(f"The disk is full: could not write {what} to '{where}'. Free some space or choose another "
                           f"output location; earlier checkpoints are intact.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(f"No permission to write {what} to '{where}'. Choose a location you can write to.")
    return ConfigError(f"Could not write {what} to '{where}': {e.strerror or e}.")


def refuse_unknown(method: str, kwargs: dict, accepted: tuple = ()) -> None:
    """Raise ConfigError naming the keyword arguments of `method` outside `accepted` (a typo must not be dropped
    silently)."""
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ConfigError(f"{method}() got unknown argument(s) {unknown}. Check the spelling; see the method's "
                          f"docstring for what it takes.")
