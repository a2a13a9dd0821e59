"""Reading a data row's images: PIL images, paths relative to the data file, or encoded bytes."""
from __future__ import annotations

import io
from pathlib import Path

from fasttune.data.paths import refuse_address
from fasttune.errors import DataError


def to_pil(value, where: str, base_dir: Path | None = None):
    """A PIL image, a path (relative to base_dir) or encoded bytes (also {"bytes": ...} / {"path": ...} as
    datasets' Image feature stores them) -> an RGB PIL image. Raises DataError naming `where` and the file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    refuse_address(value, where, "image")
    try:
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as im:
                return im.convert("RGB")
        if isinstance(value, (str, Path)):
            path = absolute(value, base_dir)
            if not path.is_file():
                raise DataError(f"{where}: image file '{path}' does not exist. Paths in the data are relative to the "
                                f"data file's folder.")
            with Image.open(path) as im:
                return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: the image cannot be read ({type(e).__name__}: {e}). Replace or remove it.") from None
    raise DataError(f"{where}: an image must be a PIL image, a file path or bytes, not {type(value).__name__}.")


def absolute(path, base_dir: Path | None) -> Path:
    """`path` made absolute against base_dir (the data file's folder) when it is relative."""
    path = Path(path).expanduser()
    return base_dir / path if not path.is_absolute() and base_dir is not None else path
