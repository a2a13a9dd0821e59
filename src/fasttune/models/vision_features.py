"""Image features of the vision-language families whose towers give per-layer hidden states or tiles: what each
family's transformers `get_image_features` computes, on transformers' own tower and projector modules attached to
a VisionCausalLM (models/vision.py), as (image tokens, hidden) features in the decoder's dtype, images in order;
and `image_geometry`, which of the processor's outputs give the images' shapes (also read by generate.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fasttune.errors import ConfigError


def image_geometry(image_grid_thw, image_sizes, image_position_ids=None, pixel_attention_mask=None,
                   batch_num_images=None):
    """The images' geometry as the processor gives it: Qwen's (t, h, w) patch grids, else the (height, width) image
    sizes (Mistral 3, LLaVA-NeXT; with LLaVA-OneVision's batch_num_images, the pair (sizes, images per row)), else
    Gemma 4's patch positions (images, patches, 2), else Idefics3's tiles' pixel masks (tiles, H, W), else None."""
    if image_sizes is not None and batch_num_images is not None and image_grid_thw is None:
        return image_sizes, batch_num_images
    for given in (image_grid_thw, image_sizes, image_position_ids, pixel_attention_mask):
        if given is not None:
            return given
    return None


def selected_layers(out, layer, drop_class_token: bool) -> torch.Tensor:
    """A tower output's hidden states of layer `layer` (an index, or a list whose states are concatenated along the
    channels, as transformers' LLaVA / Mistral 3 do), without the class token (the first) when asked."""
    states = [out.hidden_states[i] for i in (layer if isinstance(layer, (list, tuple)) else [layer])]
    if drop_class_token:
        states = [s[:, 1:] for s in states]
    return torch.cat(states, dim=-1)


def pixtral_features(model, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
    """Mistral 3: images (N, C, H, W), zero-padded to the batch's largest, with image_sizes (N, 2) their
    (height, width) in pixels -> (image tokens, hidden) features, each image's merged patches row by row, as
    transformers' Mistral3Model.get_image_features gives them: the hidden states of the tower layer(s)
    vision_feature_layer, then the projector."""
    out = model.vision_tower(pixel_values.to(model.dtype), image_sizes=image_sizes, output_hidden_states=True)
    hidden = selected_layers(out, model.hf_config.vision_feature_layer, drop_class_token=False)
    return model.multi_modal_projector(hidden.squeeze(0), image_sizes).to(model.dtype)


def tile_features(model, pixel_values: torch.Tensor, pixel_attention_mask=None) -> torch.Tensor:
    """Idefics3 / SmolVLM: the images' tiles (tiles, C, H, W), each image's crops then the whole image, in order
    (or transformers' layout (B, images, C, H, W), whose all-zero padding images are dropped) with their
    pixel_attention_mask (tiles, H, W) (1 = a real pixel; None: all) -> (tiles x image_seq_len, hidden) features, as
    transformers' Idefics3Model.get_image_features gives them: the patches with any real pixel attend in the tower,
    then the connector's pixel shuffle and projection."""
    if pixel_values.dim() == 5:  # transformers' processor: images padded per row, the padding all zeros
        pixel_values = pixel_values.flatten(0, 1)
        real = (pixel_values != 0).flatten(1).any(-1)
        real[0] = real[0] | ~real.any()  # (transformers keeps one image when all are zeros)
        pixel_values = pixel_values[real]
        if pixel_attention_mask is not None:
            pixel_attention_mask = pixel_attention_mask.flatten(0, 1)[real]
    if pixel_attention_mask is None:
        pixel_attention_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.bool,
                                          device=pixel_values.device)
    patch = model.hf_config.vision_config.patch_size
    cells = pixel_attention_mask.unfold(1, patch, patch).unfold(2, patch, patch)
    patches = cells.flatten(-2).sum(-1) > 0  # (tiles, H / patch, W / patch): patches with a real pixel
    hidden = model.vision_model(pixel_values=pixel_values.to(model.dtype), patch_attention_mask=patches,
                                return_dict=True).last_hidden_state
    return model.connector(hidden).reshape(-1, model.config.hidden_size).to(model.dtype)


def projected_tiles(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA's families: images, tiles or frames (N, C, H, W) of the tower's size -> (N, tokens a tile, hidden), as
    transformers' LLaVA models project them: the hidden states of the tower layer(s) vision_feature_layer, without
    the class token under the "default" select strategy, then the projector."""
    cfg = model.hf_config
    out = model.vision_tower(pixel_values.to(model.dtype), output_hidden_states=True, return_dict=True)
    hidden = selected_layers(out, cfg.vision_feature_layer, cfg.vision_feature_select_strategy == "default")
    return model.multi_modal_projector(hidden)


def llava_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA: images (N, C, H, W) of the tower's size -> (N x tokens an image, hidden) features, as transformers'
    LlavaModel.get_image_features gives them (projected_tiles, flattened)."""
    return projected_tiles(model, pixel_values).reshape(-1, model.config.hidden_size).to(model.dtype)


def internvl_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternVL: the images' patches (patches, C, H, W) -> (patches x tokens a patch, hidden) features, as
    transformers' InternVLModel.get_image_features gives them: the tower's output (layer -1: its last_hidden_state,
    after the tower's final norm) or layer vision_feature_layer, without the class token (select strategy
    "default"), each patch's feature grid pixel-shuffled by downsample_ratio r (side x r per side, channels / r^2, as
    its pixel_shuffle), then the projector."""
    cfg, last = model.hf_config, model.hf_config.vision_feature_layer == -1
    out = model.vision_tower(pixel_values=pixel_values.to(model.dtype), return_dict=True,
                             output_hidden_states=not last)
    drop = cfg.vision_feature_select_strategy == "default"
    feats = (out.last_hidden_state[:, 1:] if drop else out.last_hidden_state) if last else \
        selected_layers(out, cfg.vision_feature_layer, drop)
    n, side = feats.shape[0], round(feats.shape[1] ** 0.5)
    ratio, channels = cfg.downsample_ratio, feats.shape[-1]
    # transformers' pixel_shuffle: fold columns into channels, swap the axes, fold rows into channels, swap back
    x = feats.reshape(n, side, int(side * ratio), int(channels / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(side * ratio), int(side * ratio), int(channels / ratio ** 2)).permute(0, 2, 1, 3)
    return model.multi_modal_projector(x.reshape(n, -1, x.shape[-1])).reshape(-1, model.config.hidden_size) \
        .to(model.dtype)


def anyres_grid(image_size, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles LLaVA-NeXT cuts an image of image_size (height, width) pixels into: those of the
    pinpoint transformers' select_best_resolution picks (its get_anyres_image_grid_shape)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution([int(v) for v in image_size], [list(p) for p in pinpoints])
    return -(-height // tile), -(-width // tile)


def unpad_features(x: torch.Tensor, image_size) -> torch.Tensor:
    """x (C, rows, cols): a grid's features -> those of the image's own aspect ratio, the rows (or columns) of padding
    the resize to the pinpoint added removed evenly from both sides (transformers' LLaVA-NeXT unpad_image)."""
    height, width = (int(v) for v in image_size)
    rows, cols = x.shape[1:]
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return x[:, pad:rows - pad, :]
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return x[:, :, pad:cols - pad]


def llava_next_features(model, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
    """LLaVA-NeXT: each image's tiles (N, tiles, C, H, W; each image's whole-image tile first, the rest padding past
    its count) with image_sizes (N, 2), its (height, width) in pixels (LLaVA-OneVision: or the pair (image_sizes,
    batch_num_images (rows,)), whose rows of several images bring their whole-image tile only, then one newline
    feature) -> (image tokens, hidden) features, as
    transformers' LlavaNextModel.get_image_features and pack_image_features give them: every tile's hidden states of
    the tower layer(s) vision_feature_layer without the class token, the projector; per image the whole-image tile's
    features, then the grid's tiles joined into one feature map, cut back to the image's aspect ratio
    (unpad_features), for LLaVA-OneVision shrunk by bilinear interpolation when it holds more than anyres_max_N
    tiles' worth (LlavaOnevisionModel.pack_image_features), the image_newline feature after each of its rows, row by
    row."""
    from fasttune.data.vision_settings import anyres_max

    cfg = model.hf_config
    tile, side = cfg.vision_config.image_size, cfg.vision_config.image_size // cfg.vision_config.patch_size
    most = anyres_max(getattr(cfg, "vision_aspect_ratio", None))
    image_sizes, per_row = image_sizes if isinstance(image_sizes, tuple) else (image_sizes, None)
    # LLaVA-OneVision: the images of a row holding several are not tiled (their whole-image tile only)
    tiled = [True] * len(image_sizes) if per_row is None else [n == 1 for n in per_row.tolist() for _ in range(n)]
    grids = [anyres_grid(size, cfg.image_grid_pinpoints, tile) if t else None
             for size, t in zip(image_sizes.tolist(), tiled)]
    counts = [1 if grid is None else grid[0] * grid[1] + 1 for grid in grids]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts)])
    feats = projected_tiles(model, pixel_values)  # (tiles, side * side, hidden)
    newline = model.image_newline.to(feats.dtype)
    pieces = []
    for image, grid_shape, size in zip(feats.split(counts), grids, image_sizes.tolist()):
        if grid_shape is None:  # an untiled image: its tile's features and one newline
            pieces += [image[0], newline[None]]
            continue
        rows, cols = grid_shape
        grid = image[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_features(grid, size)
        if most is not None:  # LLaVA-OneVision: a grid of more than `most` tiles' features is interpolated down
            ratio = math.sqrt(grid.shape[1] * grid.shape[2] / (most * side * side))
            if ratio > 1.1:
                grid = F.interpolate(grid[None], [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)],
                                     mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1)], dim=-1)
        pieces += [image[0], grid.flatten(1, 2).transpose(0, 1)]
    return torch.cat(pieces).to(model.dtype)


def pooled_video_features(model, pixel_values_videos: torch.Tensor, num_frames=None) -> torch.Tensor:
    """LLaVA-OneVision's videos: frames (videos, frames, C, H, W), or all videos' frames (frames, C, H, W) with
    num_frames (videos,) frames each -> (video tokens, hidden) features, as transformers'
    LlavaOnevisionModel.get_video_features gives them: every frame's hidden states of the tower layer(s)
    vision_feature_layer (without the class token under "default"), the projector, each frame's (side x side) feature
    grid shrunk to ceil(side / 2) a side by bilinear interpolation (its apply_pooling), then per video its frames'
    features in order and one image_newline feature. Raises ConfigError for num_frames that do not add up to the
    frames."""
    cfg = model.hf_config
    if pixel_values_videos.dim() == 5:
        counts = [pixel_values_videos.shape[1]] * pixel_values_videos.shape[0]
        pixel_values_videos = pixel_values_videos.flatten(0, 1)
    else:
        counts = [pixel_values_videos.shape[0]] if num_frames is None else [int(n) for n in num_frames]
    if sum(counts) != pixel_values_videos.shape[0]:
        raise ConfigError(f"num_frames_per_video {counts} adds up to {sum(counts)} frames but pixel_values_videos "
                          f"holds {pixel_values_videos.shape[0]}; pass the processor's output whole.")
    feats = projected_tiles(model, pixel_values_videos)  # (frames, side * side, hidden)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    grid = feats.view(feats.shape[0], side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[math.ceil(side / 2), math.ceil(side / 2)], mode="bilinear")
    per_frame = grid.permute(0, 2, 3, 1).flatten(1, 2)  # (frames, pooled tokens, hidden)
    newline = model.image_newline.to(feats.dtype)[None]
    pieces = []
    for video in per_frame.split(counts):
        pieces += [video.flatten(0, 1), newline]
    return torch.cat(pieces).to(model.dtype)


def cross_image_inputs(model, input_ids: torch.Tensor, pixel_values, media: dict, segment_ids=None):
    """Llama 3.2 Vision's inputs to its cross-attention layers (models/cross_attention.py's CrossInputs), or None
    for a batch without images. pixel_values (B, images, tiles, C, H, W) as MllamaProcessor pads them (or (images,
    tiles, C, H, W) for one row); media: its aspect_ratio_ids (B, images), aspect_ratio_mask (B, images, tiles) and
    optionally cross_attention_mask (B, T, images, tiles), else built from the <|image|> tokens of input_ids
    (image_token_spans; segment_ids (B, T): packed rows' documents, each attending its own images). The tower's
    output of every tile goes through the projector, (B, images x tiles x patches, hidden), as transformers'
    MllamaModel gives it. Raises ConfigError for <|image|> tokens without pixels, pixels without their aspect-ratio
    inputs, a row whose <|image|> tokens are not its images' count, or a given cross_attention_mask with packed rows
    (it cannot say which document an image belongs to)."""
    from fasttune.models.cross_attention import cross_inputs, image_token_spans

    token = model.image_token_id
    if pixel_values is None:
        if bool((input_ids == token).any()):
            raise ConfigError("input_ids hold <|image|> tokens but no pixel_values were passed; pass the processor's "
                              "pixel_values, aspect_ratio_ids and aspect_ratio_mask with them.")
        return None
    ratio_ids, ratio_mask = media.get("aspect_ratio_ids"), media.get("aspect_ratio_mask")
    if ratio_ids is None or ratio_mask is None:
        raise ConfigError("Llama 3.2 Vision's pixel_values need aspect_ratio_ids (B, images) and aspect_ratio_mask "
                          "(B, images, tiles), as the processor returns them.")
    if pixel_values.dim() == 5:  # one row's images
        pixel_values, ratio_ids, ratio_mask = pixel_values[None], ratio_ids.reshape(1, -1), ratio_mask[None]
    b, images = pixel_values.shape[:2]
    if b != input_ids.shape[0]:
        raise ConfigError(f"pixel_values hold images for {b} rows but input_ids has {input_ids.shape[0]}; Llama 3.2 "
                          f"Vision takes the images per row, (B, images, tiles, C, H, W), as the processor pads them.")
    if media.get("cross_attention_mask") is None:  # the spans come from the tokens: they must match the images
        counts, real = (input_ids == token).sum(dim=1).tolist(), (ratio_ids > 0).sum(dim=1).tolist()
        for row, (n, m) in enumerate(zip(counts, real)):
            if n != m:
                raise ConfigError(f"Row {row} holds {n} image placeholder tokens (<|image|>) but {m} images: a row "
                                  f"was cut before an image (raise max_seq_length) or pixel_values do not belong to "
                                  f"these input_ids.")
    tower = model.vision_model
    dtype = next(tower.parameters()).dtype
    hidden = tower(pixel_values=pixel_values.to(dtype), aspect_ratio_ids=ratio_ids,
                   aspect_ratio_mask=ratio_mask).last_hidden_state  # (B, images, tiles, patches, out dim)
    states = model.multi_modal_projector(hidden.to(model.multi_modal_projector.weight.dtype))
    states = states.reshape(b, -1, model.config.hidden_size).to(model.dtype)
    tiles = media.get("cross_attention_mask")
    if tiles is not None and segment_ids is not None:
        raise ConfigError("Packed rows (segment_ids) take no cross_attention_mask: fasttune builds each document's "
                          "own from its <|image|> tokens; leave it out.")
    own = None
    if segment_ids is not None:
        segment_ids = segment_ids.to(input_ids.device)
        own = document_images(input_ids, token, segment_ids, images)
    if tiles is None:
        tiles = image_token_spans(input_ids, token, ratio_mask.sum(dim=-1), ratio_mask.shape[-1], segment_ids)
    return cross_inputs(states, tiles.to(input_ids.device)[:, :input_ids.shape[1]], tower.num_patches, model.dtype,
                        own)


def document_images(input_ids: torch.Tensor, image_token_id: int, segment_ids: torch.Tensor,
                    images: int) -> torch.Tensor:
    """(B, T, images) bool: for packed rows, which of its row's images (the k-th <|image|> of the row is image k)
    belong to each position's document (segment_ids (B, T), padding 0)."""
    hit = input_ids == image_token_id
    rows, cols = hit.nonzero(as_tuple=True)
    rank = (hit.cumsum(dim=1) - 1)[rows, cols]
    keep = rank < images
    image_segment = torch.zeros(input_ids.shape[0], images, dtype=segment_ids.dtype, device=input_ids.device)
    image_segment[rows[keep], rank[keep]] = segment_ids[rows[keep], cols[keep]]
    return (segment_ids[:, :, None] == image_segment[:, None, :]) & (image_segment[:, None, :] > 0)
