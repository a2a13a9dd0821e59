"""Images and frames as arrays (data/images.py's to_pil), and a processor's `videos` argument in every shape
transformers' make_batched_videos reads (data/video.py's video_list): one video or several, as a file, frames,
PIL or uint8 arrays, or one (T, H, W, C) array; and what is refused."""
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vision import patterned_frames, qwen_vl_video_processor

from fasttune.data.images import to_pil
from fasttune.errors import DataError


def test_uint8_arrays_are_images():
    pixels = patterned_frames(1, 28, 56)[0]  # (H, W, 3) uint8
    want = np.asarray(Image.fromarray(pixels))
    assert np.array_equal(np.asarray(to_pil(pixels, "x")), want)
    assert np.array_equal(np.asarray(to_pil(torch.from_numpy(pixels).permute(2, 0, 1), "x")), want)  # (C, H, W)
    grey = to_pil(pixels[..., 0], "x")  # (H, W)
    assert grey.mode == "RGB" and grey.size == (56, 28)
    with pytest.raises(DataError, match="Row 3, image 1: an image array must be uint8 .* float32"):
        to_pil(pixels.astype(np.float32) / 255, "Row 3, image 1")


def test_videos_argument_in_every_shape():
    proc = qwen_vl_video_processor()
    text = "a<|vision_start|><|video_pad|><|vision_end|>b"
    clip = patterned_frames(4, 28, 56)  # (T, H, W, 3)
    frames = [Image.fromarray(f) for f in clip]
    want = proc(text=[text], videos=[frames])
    for given in (frames, clip, [clip], list(clip), torch.from_numpy(clip)):  # one video, five ways
        got = proc(text=[text], videos=given)
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"]) and torch.equal(
            got["input_ids"], want["input_ids"])
    two = proc(text=[text + text], videos=[clip, frames])  # a list of videos stays a list
    assert two["video_grid_thw"].tolist() == [[2, 2, 4], [2, 2, 4]]
    with pytest.raises(DataError, match="videos, video 1, frame 1: an image array must be uint8"):
        proc(text=[text], videos=clip.astype(np.float32))
