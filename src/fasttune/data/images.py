"""Reading a data row's images: PIL images, paths relative to the data file, or encoded bytes."""
from __future__ import annotations

import io
from pathlib import Path

from fasttune.data.paths import refuse_address
from fasttune.errors import DataError


def to_pil(value, where: str, base_dir: Path | None = None):
    """A PIL image, a uint8 array (numpy or torch: (H, W, C), (C, H, W) or (H, W); what decord / OpenCV / torchvision
    frames are), a path (relative to base_dir) or encoded bytes (also {"bytes": ...} / {"path": ...} as datasets' Image
    feature stores them) -> an RGB PIL image. Raises DataError naming `where` and the file, or an array that is not
    uint8 pixels."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if is_array_image(value):
        return _array_to_pil(value, where)
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
    raise DataError(f"{where}: an image must be a PIL image, a uint8 array, a file path or bytes, not "
                    f"{type(value).__name__}.")


def absolute(path, base_dir: Path | None) -> Path:
    """`path` made absolute against base_dir (the data file's folder) when it is relative."""
    path = Path(path).expanduser()
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def is_array_image(value) -> bool:
    """Whether `value` is a numpy array or torch tensor (an image or frames as arrays)."""
    import numpy as np
    import torch

    return isinstance(value, (np.ndarray, torch.Tensor))


def channels_first(shape) -> bool:
    """Whether an image array of `shape` is (C, H, W) (torchvision's layout) rather than (H, W, C) or (H, W)."""
    return len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)


def _array_to_pil(value, where: str):
    """A uint8 (H, W, C), (C, H, W) or (H, W) array -> an RGB PIL image; DataError naming `where` otherwise."""
    import numpy as np
    from PIL import Image

    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if channels_first(array.shape):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise DataError(f"{where}: an image array must be uint8 pixels shaped (H, W, C), (C, H, W) or (H, W); got "
                        f"{array.dtype} {tuple(array.shape)}. Scale it to 0-255 and cast it to uint8 first.")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).convert("RGB")
