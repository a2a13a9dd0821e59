"""User-facing errors. Every error a user can cause is a FastTuneError with one actionable paragraph."""


class FastTuneError(Exception):
    """Base class: the CLI prints the message without a traceback and exits non-zero."""


class ModelLoadError(FastTuneError):
    """A model path, checkpoint or architecture that cannot be loaded."""


class DataError(FastTuneError):
    """A dataset file, row or field that cannot be used."""


class ConfigError(FastTuneError):
    """A training/LoRA option that is invalid or unsupported."""
