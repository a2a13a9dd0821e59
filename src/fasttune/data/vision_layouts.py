"""How vision-language processors lay images out, apart from the processor (data/vision.py) that uses them:
LLaVA-NeXT's / LLaVA-OneVision's anyres feature count, Idefics3's tile marks and Llama 3.2 Vision's per-row image
batch. Each is written from the transformers processor named in its docstring and tested against it."""
from __future__ import annotations

from fasttune.errors import DataError


def anyres_token_count(height: int, width: int, pinpoints, tile: int, patch: int, most: int | None = None) -> int:
    """LLaVA-NeXT's feature count of an image of height x width pixels (LlavaNextProcessor._get_number_of_features
    with the "default" select strategy; LLaVA-OneVision's with `most`, its anyres_max_N): the whole image's tile,
    (tile / patch)^2 features; then the grid of tiles of the pinpoint transformers' select_best_resolution picks for
    it, (tile / patch) features a tile side, cut back to the image's aspect ratio (the padding rows or columns
    dropped, as the model's unpad drops them; with `most`, shrunk by the ratio r = sqrt(rows x cols / (most x
    (tile / patch)^2)) when r > 1.1, as the model's interpolation shrinks it), plus one newline feature a row."""
    import math

    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([height, width], [list(p) for p in pinpoints])
    side = tile // patch
    rows, cols = side * (best_h // tile), side * (best_w // tile)
    if width / height > cols / rows:  # wider than the grid: rows of padding above and below
        rows -= (rows - int(round(height * (cols / width), 7))) // 2 * 2
    else:
        cols -= (cols - int(round(width * (rows / height), 7))) // 2 * 2
    ratio = math.sqrt(rows * cols / (most * side * side)) if most is not None else 0.0
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols + rows


def tile_mark(row: int, col: int) -> str:
    """Idefics3's token for the crop at (row, col), both from 1."""
    return f"<row_{row}_col_{col}>"


def flat_ints(values) -> list[int]:
    """The image processor's per-row lists of rows / cols (one image a row here) as one list of ints."""
    return [int(v) for row in values for v in (row if isinstance(row, (list, tuple)) else [row])]


def cross_image_batch(image_processor, images: list, rows: list[int] | None = None) -> dict:
    """Llama 3.2 Vision's images as MllamaProcessor batches them: per row its images' tiles, pixel_values (rows,
    images, max tiles, C, H, W) float32, aspect_ratio_ids (rows, images) and aspect_ratio_mask (rows, images, max
    tiles) long, `images` the most any row holds; a row's missing images are zero pixels with id 0 and only their
    first tile unmasked, as MllamaImageProcessor pads them. rows: how many of the images (in order) each row holds
    (None: one each). Each image is processed on its own, which gives what a call on the nested rows gives. Raises
    DataError when the rows' counts do not add up to the images."""
    rows = [1] * len(images) if rows is None else list(rows)
    if sum(rows) != len(images):
        raise DataError(f"The rows hold {sum(rows)} <|image|> placeholders but {len(images)} images were given.")
    out = image_processor(images=[[im] for im in images], return_tensors="pt")
    pixels, ids, mask = out["pixel_values"][:, 0], out["aspect_ratio_ids"][:, 0], out["aspect_ratio_mask"][:, 0]
    most = max(max(rows, default=1), 1)
    batch = {"pixel_values": pixels.new_zeros(len(rows), most, *pixels.shape[1:]),
             "aspect_ratio_ids": ids.new_zeros(len(rows), most),
             "aspect_ratio_mask": mask.new_zeros(len(rows), most, mask.shape[-1])}
    batch["aspect_ratio_mask"][:, :, 0] = 1
    start = 0
    for r, n in enumerate(rows):
        for key, value in (("pixel_values", pixels), ("aspect_ratio_ids", ids), ("aspect_ratio_mask", mask)):
            batch[key][r, :n] = value[start:start + n]
        start += n
    return batch
