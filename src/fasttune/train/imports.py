"""User code named in a setting (the command line, YAML): reward functions, tools and environment factories given as
`package.module.name` (an import path, as TRL's command line takes reward functions) or `path/to/file.py:name` (a
file that needs no install)."""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

from fasttune.errors import ConfigError

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_FILE = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_]\w*)$")


def is_import_spec(spec) -> bool:
    """Whether `spec` is a string written as an import path (a.b.c) or file.py:name."""
    return isinstance(spec, str) and bool(_DOTTED.match(spec.strip()) or _FILE.match(spec.strip()))


def _file_module(path: Path, field: str, spec: str):
    """The module of a .py file, loaded once per process (kept in sys.modules under a name made from its path, so
    that a second setting naming it gets the same objects)."""
    key = "fasttune_user_" + re.sub(r"\W", "_", str(path))
    if key in sys.modules:
        return sys.modules[key]
    loader = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[key] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:
        del sys.modules[key]
        raise ConfigError(f"{field}: '{spec}': running {path} failed ({type(e).__name__}: {e}). Fix the file.") from e
    return module


def import_object(spec: str, field: str):
    """The object a spec names: `package.module.name` imported (the module must be importable: installed, or on
    PYTHONPATH), or `path/to/file.py:name` from that file (a relative path from the working directory).

    Returns the object. Raises ConfigError naming `field` and the spec for a spec of neither form, a module or file
    that does not exist or fails to import, or a missing name."""
    spec = spec.strip()
    match = _FILE.match(spec)
    if match:
        path = Path(match["path"]).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{field}: '{spec}' names the file {path}, which does not exist. Give a .py file and the "
                              f"name in it (path/to/file.py:name).")
        module, name = _file_module(path, field, spec), match["name"]
    elif _DOTTED.match(spec):
        module_path, name = spec.rsplit(".", 1)
        try:
            module = importlib.import_module(module_path)
        except ImportError as e:
            raise ConfigError(f"{field}: '{spec}': the module {module_path} cannot be imported ({e}). Install it or "
                              f"put its folder on PYTHONPATH, or write path/to/file.py:{name}.") from e
    else:
        raise ConfigError(f"{field}: '{spec}' is not an import path; write package.module.name or "
                          f"path/to/file.py:name.")
    if not hasattr(module, name):
        raise ConfigError(f"{field}: '{spec}': {getattr(module, '__file__', module)} defines no '{name}'.")
    return getattr(module, name)


def import_callables(specs, field: str) -> list:
    """Import specs (a list, or one comma-separated string) -> their callables. Raises ConfigError as import_object,
    and for an object that is not callable."""
    items = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    out = []
    for spec in items:
        obj = import_object(spec, field) if isinstance(spec, str) else spec
        if not callable(obj):
            raise ConfigError(f"{field}: '{spec}' is a {type(obj).__name__}, not a function or class.")
        out.append(obj)
    return out
