"""Videos given as their frames, for Qwen2-VL and Qwen2.5-VL: `{"type": "video", "video": [frame, ...]}` items in
data rows and prompts (frames as PIL images, paths or bytes, already sampled; `"fps"`: the frames' rate).

transformers' video processors need torchvision; the same numbers come from the checkpoint's image processor here:
each frame resized as Qwen2VLVideoProcessor resizes a video (smart_resize to multiples of patch x merge within the
video size limits of video_preprocessor_config.json), the frames padded to a multiple of temporal_patch_size by
repeating the last, and each group of temporal_patch_size frames laid out as one temporal patch: rows (t, h/m, w/m,
m, m), each (C, T, P, P) (Qwen2VLVideoProcessor.patchify). Qwen2.5-VL's second_per_grid_ts is temporal_patch_size /
fps, with transformers' 24 frames a second for frames given without their rate (VideoMetadata.sampled_fps). Each
video becomes one run of t * h * w / merge^2 video tokens, as Qwen2VLProcessor writes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fasttune.data.formats import positive_number
from fasttune.data.images import absolute, to_pil
from fasttune.errors import DataError

VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}  # Qwen2VLVideoProcessor.size
DEFAULT_FPS = 24.0  # transformers' VideoMetadata.sampled_fps for frames without metadata
VIDEO_CONFIG = "video_preprocessor_config.json"


def read_video_size(folder: Path) -> dict:
    """The video size limits in pixels ({"shortest_edge", "longest_edge"}) from a checkpoint's
    video_preprocessor_config.json (its `size`, or min_pixels / max_pixels), else Qwen2VLVideoProcessor's."""
    path = Path(folder) / VIDEO_CONFIG
    if not path.is_file():
        return dict(VIDEO_SIZE)
    config = json.loads(path.read_text())
    size = dict(config.get("size") or VIDEO_SIZE)
    if config.get("min_pixels"):
        size["shortest_edge"] = config["min_pixels"]
    if config.get("max_pixels"):
        size["longest_edge"] = config["max_pixels"]
    return {"shortest_edge": int(size["shortest_edge"]), "longest_edge": int(size["longest_edge"])}


class VideoFrames:
    """The video half of data/vision.py's VisionProcessor (a mixin): it needs `image_processor` (Qwen's),
    `video_token` (None for a model whose videos the data pipeline does not read), `video_size` and
    `merge_size` set by the processor."""

    def _frames_out(self, frames: list) -> tuple[torch.Tensor, list[int]]:
        """One video's frames (PIL images of one size) -> (per-frame patches (frames, h * w, C, P, P), [h, w])."""
        sizes = {f.size for f in frames}
        if len(sizes) != 1:
            raise DataError(f"A video's frames must all have one size; got {sorted(sizes)}. Resize them first.")
        ip = self.image_processor
        out = ip(images=frames, size=self.video_size, return_tensors="pt")
        grid = out["image_grid_thw"][0].tolist()
        patch, tps = int(ip.patch_size), int(ip.temporal_patch_size)
        per_frame = torch.as_tensor(out["pixel_values"]).view(len(frames), grid[1] * grid[2], 3, tps, patch, patch)
        return per_frame[:, :, :, 0], grid[1:]  # (an image repeats itself along T: one copy)

    def process_videos(self, videos: list[list], fps: list[float] | None = None) -> dict:
        """Videos (each a list of PIL frames) -> {"pixel_values_videos" (patches, C * T * P * P) float32,
        "video_grid_thw" (videos, 3) long, "second_per_grid_ts" (videos,) float32}, as transformers'
        Qwen2VLVideoProcessor / Qwen2_5_VLProcessor return them (see the module docstring)."""
        tps = int(self.image_processor.temporal_patch_size)
        patches, grids = [], []
        for frames in videos:
            frames = list(frames) + [frames[-1]] * (-len(frames) % tps)
            per_frame, (h, w) = self._frames_out(frames)
            t = len(frames) // tps
            grouped = per_frame.view(t, tps, h * w, *per_frame.shape[2:]).permute(0, 2, 3, 1, 4, 5)
            patches.append(grouped.reshape(t * h * w, -1))
            grids.append([t, h, w])
        rates = fps or [DEFAULT_FPS] * len(videos)
        return {"pixel_values_videos": torch.cat(patches).float(), "video_grid_thw": torch.tensor(grids).long(),
                "second_per_grid_ts": torch.tensor([tps / float(r) for r in rates])}

    def video_grids(self, videos: list[list]) -> list[list[int]]:
        """Per video (a list of frames: PIL images, or sources to_pil reads) its (t, h, w) grid, frames padded to a
        multiple of temporal_patch_size; only each video's first frame is read."""
        if not videos:
            return []
        tps = int(self.image_processor.temporal_patch_size)
        grids = []
        for frames in videos:
            first = to_pil(frames[0], "a video's first frame")
            sizes = self.image_processor(images=[first], size=self.video_size, return_tensors="pt")
            h, w = sizes["image_grid_thw"][0].tolist()[1:]
            grids.append([-(-len(frames) // tps), h, w])
        return grids

    def expand_videos(self, text: str, grids: list) -> str:
        """Each video token of `text` repeated to its video's token count (t * h * w / merge^2)."""
        if self.video_token is None:
            return text
        parts = text.split(self.video_token)
        if len(parts) - 1 != len(grids):
            raise DataError(f"The text has {len(parts) - 1} video placeholders but {len(grids)} videos were given.")
        tokens = [int(torch.tensor(g).prod()) // self.merge_size ** 2 for g in grids]
        return "".join([parts[0]] + [self.video_token * n + rest for n, rest in zip(tokens, parts[1:])])

    def frame_sources(self, filmed: list, where: str, base_dir: Path | None = None) -> list:
        """_split_media's (source, fps) videos -> (frame sources, fps) pairs, nothing decoded: a source is a list of
        frames (PIL images, paths, bytes) or a folder of image files (taken in name order). Raises DataError naming
        `where` for a video on a model whose videos the data pipeline does not read, a video file, an empty folder,
        or a frame path that does not exist."""
        if filmed and self.video_token is None:
            raise DataError(f"{where}: has a video item; fasttune's data pipeline reads videos for Qwen2-VL and "
                            f"Qwen2.5-VL only (other families' videos train through the model with the processor's "
                            f"pixel_values_videos and video_grid_thw, or pass sampled frames as images).")
        out = []
        for i, (src, fps) in enumerate(filmed):
            at = f"{where}, video {i + 1}"
            if isinstance(src, (str, Path)) and absolute(src, base_dir).is_dir():
                folder = absolute(src, base_dir)
                src = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                if not src:
                    raise DataError(f"{at}: the folder '{folder}' holds no .png / .jpg / .webp frames.")
            elif not isinstance(src, (list, tuple)) or not src:
                raise DataError(f"{at}: a video is its list of frames (images, paths or bytes) or a folder of frame "
                                f"images, not {type(src).__name__}; decode a video file into frames first (e.g. "
                                f"with PyAV or torchvision) at the rate you want, and give that rate as 'fps'.")
            for j, f in enumerate(src):
                if isinstance(f, (str, Path)) and not absolute(f, base_dir).is_file():
                    raise DataError(f"{at}, frame {j + 1}: image file '{absolute(f, base_dir)}' does not exist.")
            out.append(([absolute(f, base_dir) if isinstance(f, (str, Path)) else f for f in src], fps))
        return out

    def video_sources(self, filmed: list, where: str, base_dir: Path | None = None) -> list:
        """frame_sources, each frame decoded: (PIL frames, fps) pairs. Raises what frame_sources raises, and
        DataError naming `where` for an unreadable frame."""
        return [([to_pil(f, f"{where}, video {i + 1}, frame {j + 1}") for j, f in enumerate(frames)], fps)
                for i, (frames, fps) in enumerate(self.frame_sources(filmed, where, base_dir))]

def video_rate(item: dict, where: str):
    """A video item's "fps" (frames a second of its frames), DEFAULT_FPS when absent; DataError for a value that is
    not a positive number."""
    return positive_number(item.get("fps", DEFAULT_FPS), where, "a video's 'fps'")
