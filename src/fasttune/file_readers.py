"""Readers for the files users hand fasttune: JSON and YAML configs, UTF-8 data files, weights (safetensors,
PyTorch .bin, GGUF). Every failure (unreadable, not UTF-8, bad syntax, truncated, corrupt) is one FastTuneError
paragraph naming the file and what to do, never the parser's traceback."""
from __future__ import annotations

import codecs
import json
import zipfile
from pathlib import Path
from typing import Any

from fasttune.errors import ConfigError, DataError, FastTuneError, ModelLoadError

# What to do about a damaged model file; callers pass their own for adapters and checkpoints.
REDOWNLOAD = ("Download or copy it again (an interrupted download or copy leaves such files), or save the model again "
              "with save_pretrained.")


def check_utf8(path: str | Path, error: type[FastTuneError] = DataError, chunk: int = 1 << 20) -> None:
    """Raise `error` naming the file, line and byte when `path` is not UTF-8 text (read in chunks, so any size)."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with _opened(path, error) as f:
        while True:
            block = f.read(chunk)
            held = len(decoder.getstate()[0])  # bytes of a character split over the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise error(_not_utf8(path, block, e.start - held, offset, lines)) from None
            if not block:
                return
            offset, lines = offset + len(block), lines + block.count(b"\n")


def _not_utf8(path: Path, data: bytes, start: int, offset: int = 0, lines: int = 0) -> str:
    """The message for a decode error at data[start] (`data` begins at byte `offset`, after `lines` newlines)."""
    if offset == 0 and data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        what = "it is UTF-16 text"
    else:
        start = max(0, min(start, len(data) - 1))
        line = lines + data[:start].count(b"\n") + 1
        what = f"byte 0x{data[start:start + 1].hex()} on line {line} (offset {offset + start}) is not valid UTF-8"
    return (f"'{path}' is not UTF-8 text: {what}. fasttune reads text files as UTF-8: save it with that encoding "
            f"(an editor's 'Save with encoding', or `iconv -f <its encoding> -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix}`) and pass the converted file.")


class _opened:
    """open(path, 'rb') whose OSError becomes `error` naming the file."""

    def __init__(self, path: Path, error: type[FastTuneError]):
        self.path, self.error = path, error

    def __enter__(self):
        try:
            self.f = self.path.open("rb")
        except OSError as e:
            raise self.error(f"Cannot read '{self.path}': {e.strerror or e}. Check the path and its "
                             f"permissions.") from None
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def read_text(path: str | Path, error: type[FastTuneError] = ConfigError) -> str:
    """The file as UTF-8 text; a missing/unreadable file or one that is not UTF-8 raises `error` naming it."""
    path = Path(path)
    with _opened(path, error) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(_not_utf8(path, data, e.start)) from None


def read_json(path: str | Path, error: type[FastTuneError] = ModelLoadError, fix: str = REDOWNLOAD,
              expect: type | None = dict) -> Any:
    """Parse a JSON file; unreadable, non-UTF-8 or invalid JSON (or not an `expect`, e.g. an object) raises `error`
    naming the file, the line and column, and `fix`."""
    path = Path(path)
    text = read_text(path, error)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"'{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. Fix that place in "
                    f"the file, or replace the file: {fix}") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object ({...})", list: "a list ([...])"}.get(expect, expect.__name__)
        raise error(f"'{path}' must hold {kind}, but holds {type(value).__name__}. {fix}")
    return value


def read_yaml(path: str | Path, error: type[FastTuneError] = ConfigError) -> Any:
    """Parse a YAML file; unreadable, non-UTF-8 or invalid YAML raises `error` naming the file, line and column."""
    import yaml

    path = Path(path)
    text = read_text(path, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"Config file '{path}' is not valid YAML: {problem}{where}. Write one `setting: value` per line "
                    f"(quote values that contain ': ' or ' #'; lists as [a, b]).") from None


def damaged_weights(path: str | Path, error: BaseException, kind: str, fix: str = REDOWNLOAD) -> ModelLoadError:
    """ModelLoadError for a weights file its reader refused: truncated, corrupt or not that format."""
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    return ModelLoadError(f"Cannot read '{path}' as {kind}: the file is truncated, corrupt or not a {kind} file "
                          f"({type(error).__name__}: {reason}). {fix}")


def check_safetensors(path: str | Path, fix: str = REDOWNLOAD) -> None:
    """Open the header of a .safetensors file (cheap: the tensors are not read); safetensors checks that the file
    is exactly as long as the header says, so truncation shows here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError (header, length), OSError
        raise damaged_weights(path, e, "safetensors", fix) from None


def iter_safetensors(path: str | Path, fix: str = REDOWNLOAD):
    """Yield (name, tensor) of a .safetensors file, one tensor at a time; a damaged file raises ModelLoadError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as sf:
            for k in sf.keys():
                yield k, sf.get_tensor(k)
    except FastTuneError:
        raise
    except Exception as e:  # SafetensorError, OSError; not GeneratorExit (a BaseException)
        raise damaged_weights(path, e, "safetensors", fix) from None


# safetensors' dtype names (its header's "dtype" field) -> torch dtype names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def meta_safetensors(path: str | Path, fix: str = REDOWNLOAD):
    """Yield (name, empty tensor on the meta device) of a .safetensors file from its header alone (each tensor's
    shape and dtype; no tensor data is read); a damaged file or an unknown dtype raises ModelLoadError."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as sf:
            for k in sf.keys():
                view = sf.get_slice(k)
                dtype = getattr(torch, SAFETENSORS_DTYPES[view.get_dtype()])
                yield k, torch.empty(view.get_shape(), dtype=dtype, device="meta")
    except FastTuneError:
        raise
    except Exception as e:  # SafetensorError, OSError, KeyError (a dtype name not in the table)
        raise damaged_weights(path, e, "safetensors", fix) from None


def load_safetensors(path: str | Path, fix: str = REDOWNLOAD) -> dict:
    """All tensors of a .safetensors file as a CPU dict, like safetensors.torch.load_file (read through
    iter_safetensors); damage raises ModelLoadError."""
    return dict(iter_safetensors(path, fix))


def check_torch_zip(path: str | Path, fix: str = REDOWNLOAD) -> None:
    """A PyTorch .bin saved by torch.save is a zip archive: a truncated one has no central directory (cheap to
    check: only the end of the file is read). Files in the legacy pickle format are left to torch_load."""
    if zipfile.is_zipfile(path):
        return
    with _opened(Path(path), ModelLoadError) as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a pickle (legacy torch.save): torch_load will tell
        return
    why = ("the zip archive torch.save writes has no end (central directory)" if head == b"PK" else
           "it is neither the zip archive torch.save writes nor a pickle")
    raise damaged_weights(path, ValueError(why), "PyTorch weights", fix)


def torch_load(path: str | Path, fix: str = REDOWNLOAD):
    """torch.load(path, weights_only=True) on the CPU; a damaged file, or one holding pickled Python objects other
    than tensors, raises ModelLoadError naming it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError (zip), UnpicklingError, EOFError, OSError, ...
        raise damaged_weights(path, e, "PyTorch weights",
                              "fasttune reads .bin files with weights_only=True, so they may hold tensors only. "
                              + fix) from None


def check_weight_files(files) -> None:
    """Cheap checks of every weight file of a checkpoint before loading any (headers and archive directories)."""
    for f in files:
        f = Path(f)
        if f.suffix == ".safetensors":
            check_safetensors(f)
        elif f.suffix == ".bin":
            check_torch_zip(f)


def gguf_failure(path: str | Path, error: BaseException) -> ModelLoadError:
    """ModelLoadError for a .gguf file transformers could not read: not a GGUF file at all, truncated/corrupt
    (the gguf package cannot parse it either), or a valid file transformers does not support."""
    path = Path(path)
    with _opened(path, ModelLoadError) as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return ModelLoadError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes; an HTML "
                              f"error page saved as .gguf looks like this). Download the .gguf file again, or pass a "
                              f"model folder.")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError on truncated or corrupt files
        return damaged_weights(path, e, "GGUF")
    reason = " ".join(str(error).split())[:300]
    return ModelLoadError(f"transformers cannot load the GGUF file '{path}' ({type(error).__name__}: {reason}). Use "
                          f"a GGUF of a supported architecture, or the model's transformers folder.")
