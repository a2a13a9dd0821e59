"""Videos given as their frames, for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and Gemma 4: `{"type": "video",
"video": [frame, ...]}` items in data rows and prompts (frames as PIL images, paths or bytes, already sampled;
`"fps"`: the frames' rate).

transformers' video processors need torchvision; the same numbers come from the checkpoint's image processor here:
each frame resized as Qwen2VLVideoProcessor resizes a video (smart_resize to multiples of patch x merge within the
video size limits of video_preprocessor_config.json), the frames padded to a multiple of temporal_patch_size by
repeating the last, and each group of temporal_patch_size frames laid out as one temporal patch: rows (t, h/m, w/m,
m, m), each (C, T, P, P) (Qwen2VLVideoProcessor.patchify). Qwen2.5-VL's second_per_grid_ts is temporal_patch_size /
fps, with transformers' 24 frames a second for frames given without their rate (VideoMetadata.sampled_fps). Each
video becomes one run of t * h * w / merge^2 video tokens, as Qwen2VLProcessor writes it.

Qwen3-VL and Qwen3.5 (`video_stamps`), as Qwen3VLVideoProcessor / Qwen3VLProcessor of transformers 5.24 do it with
frames given as sampled (do_sample_frames=False): one size for all frames of a video, from the frame count and the
first frame's size (its smart_resize: t x h x w within the size limits, h and w multiples of patch x merge; with
`cap_pixels_per_frame`, qwen-vl-utils' per-frame cap of max_video_tokens patches), frames of another size resized
with PIL's bicubic filter (transformers' torchvision resize antialiases slightly differently; frames already at that
size are bit-equal); and in the text, the video token becomes, per temporal patch, "<{seconds:.1f} seconds>" + vision
start + its h * w / merge^2 video tokens + vision end, the seconds the mean of the patch's first and last frame times
(frame index / fps, the last frame repeated to fill the patch); the template's own vision start / end around the video
token stay, as transformers' processor leaves them. A video needs at least temporal_patch_size frames there.

Gemma 4, as Gemma4VideoProcessor / Gemma4Processor do it: each frame is an image through the image processor at the
video processor's soft-token budget (max_soft_tokens, 70 by default: the aspect-preserving resize, padded patches and
their positions), giving pixel_values_videos, video_position_ids and num_frames_per_video; in the text, the video
token becomes per frame "mm:ss <boi>" + its soft tokens (the video token repeated) + "<eoi>", frames joined by
spaces, mm:ss the frame's time (frame index / fps, whole seconds).

LLaVA-OneVision, as LlavaOnevisionVideoProcessor / LlavaOnevisionProcessor do it (video settings with "pooled"): each
frame resized to the video processor's size (its height x width, PIL's bicubic filter; transformers' torchvision resize
antialiases slightly differently, frames already at that size are bit-equal), scaled to [0, 1] and normalised with
the video processor's mean and std (OpenAI CLIP's by default), giving pixel_values_videos (videos, frames, C, H, W),
or, when the videos of a call differ in length, all frames (frames, C, H, W) with num_frames_per_video; in the text,
the video token repeated frames x ceil(side / 2)^2 + 1 times (side: the tower's patches a side; the last token is
the video's newline feature).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from fasttune.data.formats import positive_number
from fasttune.data.images import absolute, channels_first, is_array_image, to_pil
from fasttune.data.paths import refuse_address
from fasttune.data.video_file import VIDEO_SUFFIXES, VideoFile, is_video_file
from fasttune.errors import DataError

VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}  # Qwen2VLVideoProcessor.size
# Qwen3VLVideoProcessor's size, and its sampling of given frames (on by default: 2 a second, 4 to 768 frames)
QWEN3_VIDEO_SIZE = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768, "do_sample_frames": True,
                    "fps": 2.0, "min_frames": 4, "max_frames": 768}
QWEN3_MAX_VIDEO_TOKENS = 768  # Qwen3VLVideoProcessor.max_video_tokens (the per-frame cap's patches)
DEFAULT_FPS = 24.0  # transformers' VideoMetadata.sampled_fps for frames without metadata
VIDEO_CONFIG = "video_preprocessor_config.json"
NORMALISATION = ("image_mean", "image_std", "do_normalize")
# Gemma4VideoProcessor's 70 soft tokens a frame, and its sampling of given frames (on by default: 32, evenly)
GEMMA4_VIDEO = {"max_soft_tokens": 70, "do_sample_frames": True, "num_frames": 32}
SAMPLING = ("do_sample_frames", "fps", "min_frames", "max_frames", "num_frames")  # (the video config's keys)


def read_video_settings(folder: Path, default: dict | None = None) -> dict:
    """The video processor's settings from a checkpoint's video_preprocessor_config.json, else `default`
    (Qwen2VLVideoProcessor's size when None): the size limits in pixels ({"shortest_edge", "longest_edge"}: its
    `size`, or min_pixels / max_pixels), with its cap_pixels_per_frame set "max_video_tokens" too (Qwen3-VL's
    per-frame cap); or, where `default` has "max_soft_tokens" (Gemma 4), a frame's soft-token budget. Also its
    "image_mean" / "image_std" / "do_normalize" when it gives them (a video's normalisation may differ from the
    images'), and how processor calls sample given frames (SAMPLING's keys, from it or `default`)."""
    path = Path(folder) / VIDEO_CONFIG
    default = dict(default or VIDEO_SIZE)
    config = json.loads(path.read_text()) if path.is_file() else {}
    if "pooled" in default:  # LLaVA-OneVision: one frame size, the tower's patches a side
        size = config.get("size") or {}
        out = {"height": int(size.get("height", default["height"])), "width": int(size.get("width", default["width"])),
               "pooled": int(default["pooled"])}
    elif "max_soft_tokens" in default:
        out = {"max_soft_tokens": int(config.get("max_soft_tokens") or default["max_soft_tokens"])}
    else:
        size = dict(config.get("size") or default)
        if config.get("min_pixels"):
            size["shortest_edge"] = config["min_pixels"]
        if config.get("max_pixels"):
            size["longest_edge"] = config["max_pixels"]
        out = {"shortest_edge": int(size["shortest_edge"]), "longest_edge": int(size["longest_edge"])}
        if config.get("cap_pixels_per_frame"):
            out["max_video_tokens"] = int(config.get("max_video_tokens") or QWEN3_MAX_VIDEO_TOKENS)
    for key in NORMALISATION:
        if config.get(key) is not None:
            out[key] = [float(v) for v in config[key]] if isinstance(config[key], list) else config[key]
    for key in SAMPLING:  # how a processor call samples given frames (transformers' defaults per family)
        if config.get(key, default.get(key)) is not None:
            out[key] = config.get(key, default.get(key))
    return out


def video_config(size: dict) -> dict:
    """What read_video_settings reads back from `size` (video_preprocessor_config.json's fields)."""
    if "max_soft_tokens" in size:
        out = {"max_soft_tokens": size["max_soft_tokens"]}
    elif "pooled" in size:
        out = {"size": {k: size[k] for k in ("height", "width")}}
    else:
        out = {"size": {k: size[k] for k in ("shortest_edge", "longest_edge")}}
    if "max_video_tokens" in size:
        out.update(cap_pixels_per_frame=True, max_video_tokens=size["max_video_tokens"])
    out.update({k: size[k] for k in NORMALISATION + SAMPLING if k in size})
    return out


def qwen3_frame_size(frames: int, height: int, width: int, factor: int, tps: int, size: dict,
                     where: str = "a video") -> tuple[int, int]:
    """Qwen3-VL's size (height, width) for all `frames` of a video of height x width pixels: transformers'
    Qwen3VLVideoProcessor.resize and its smart_resize (`factor` = patch x merge, `tps` the temporal patch size,
    `size` read_video_settings's limits on t x h x w, and its per-frame cap when "max_video_tokens" is there). Raises
    DataError naming `where` for fewer than `tps` frames or an aspect ratio over 200, as that processor refuses
    them."""
    if frames < tps:
        raise DataError(f"{where}: a Qwen3-VL video needs at least {tps} frames (its video processor's "
                        f"temporal_patch_size); got {frames}. Give more frames, or the frame as an image.")
    low, high = size["shortest_edge"], size["longest_edge"]
    if "max_video_tokens" in size:  # qwen-vl-utils' cap: each frame's share of the budget, at most the token cap
        per_frame = max(min(size["max_video_tokens"] * factor * factor, high // frames), int(low * 1.05))
        high = per_frame * frames
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"{where}: frames of {width} x {height} pixels; the aspect ratio must be under 200.")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / tps) * tps
    if t * h * w > high:
        beta = math.sqrt(frames * height * width / high)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor)
                                                                               * factor)
    elif t * h * w < low:
        beta = math.sqrt(low / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patch_stamps(times: list[float], tps: int) -> list[float]:
    """Frame times (seconds) -> one per temporal patch: the mean of its first and last frame's, the last frame
    repeated to fill the last patch (Qwen3VLProcessor._calculate_timestamps)."""
    times = list(times) + [times[-1]] * (-len(times) % tps)
    return [(times[i] + times[i + tps - 1]) / 2 for i in range(0, len(times), tps)]


class VideoFrames:
    """The video half of data/vision.py's VisionProcessor (a mixin): it needs `image_processor` (Qwen's),
    `video_token` (None for a model whose videos the data pipeline does not read), `video_settings`, `merge_size` and
    `video_stamps` (Qwen3-VL's layout: the vision start / end tokens, else None) set by the processor; with
    `soft_token_marks` set (Gemma 4), frames are images with the video's soft-token budget (see the module
    docstring)."""

    def _gemma_frames(self, frames: list) -> dict:
        """Gemma 4: one video's frames through the image processor at the video processor's soft-token budget ->
        its pixel_values (frames, patches, P * P * C), image_position_ids (frames, patches, 2) and
        num_soft_tokens_per_image (as Gemma4VideoProcessor pads and positions them)."""
        norm = {k: self.video_settings[k] for k in NORMALISATION if k in self.video_settings}
        return self.image_processor(images=frames, max_soft_tokens=self.video_settings["max_soft_tokens"],
                                    return_tensors="pt", **norm)

    def _frames_out(self, frames: list) -> tuple[torch.Tensor, list[int]]:
        """One video's frames (PIL images of one size) -> (per-frame patches (frames, h * w, C, P, P), [h, w])."""
        ip = self.image_processor
        size = self._pixel_limits()
        if self.video_stamps:  # one size from the frame count; the image processor then keeps it
            h, w = self._qwen3_size(len(frames), frames[0])
            if frames[0].size != (w, h):
                from PIL import Image

                frames = [f.convert("RGB").resize((w, h), Image.BICUBIC) for f in frames]
            size = {"shortest_edge": h * w, "longest_edge": h * w}
        norm = {k: self.video_settings[k] for k in NORMALISATION if k in self.video_settings}
        out = ip(images=frames, size=size, return_tensors="pt", **norm)
        grid = out["image_grid_thw"][0].tolist()
        patch, tps = int(ip.patch_size), int(ip.temporal_patch_size)
        per_frame = torch.as_tensor(out["pixel_values"]).view(len(frames), grid[1] * grid[2], 3, tps, patch, patch)
        return per_frame[:, :, :, 0], grid[1:]  # (an image repeats itself along T: one copy)

    @property
    def _pooled(self) -> bool:
        """Whether videos are LLaVA-OneVision's: frames of one size, each frame's features pooled (see the module
        docstring)."""
        return "pooled" in (self.video_settings or {})

    def _pooled_frames(self, videos: list[list]) -> dict:
        """LLaVA-OneVision: videos (PIL frames) -> pixel_values_videos (videos, frames, C, H, W) float32, or (all
        frames, C, H, W) with num_frames_per_video (videos,) when their lengths differ, as LlavaOnevisionVideoProcessor
        makes them (see the module docstring)."""
        from PIL import Image

        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        s = self.video_settings
        h, w = s["height"], s["width"]
        mean = torch.tensor(s.get("image_mean", OPENAI_CLIP_MEAN), dtype=torch.float32)[:, None, None]
        std = torch.tensor(s.get("image_std", OPENAI_CLIP_STD), dtype=torch.float32)[:, None, None]
        out = []
        for frames in videos:
            rgb = [f.convert("RGB") for f in frames]
            rgb = [f if f.size == (w, h) else f.resize((w, h), Image.BICUBIC) for f in rgb]
            pixels = torch.from_numpy(np.stack([np.asarray(f) for f in rgb])).permute(0, 3, 1, 2).float() / 255
            out.append((pixels - mean) / std if s.get("do_normalize", True) else pixels)
        if len({len(v) for v in out}) == 1:
            return {"pixel_values_videos": torch.stack(out)}
        return {"pixel_values_videos": torch.cat(out), "num_frames_per_video": torch.tensor([len(v) for v in out])}

    def _pixel_limits(self) -> dict:
        """The video settings' size limits alone (the image processor's `size`)."""
        return {k: self.video_settings[k] for k in ("shortest_edge", "longest_edge")}

    def _qwen3_size(self, frames: int, first, where: str = "a video") -> tuple[int, int]:
        """qwen3_frame_size for a video of `frames` frames whose first frame (a PIL image) is `first`."""
        ip = self.image_processor
        return qwen3_frame_size(frames, first.height, first.width, int(ip.patch_size) * self.merge_size,
                                int(ip.temporal_patch_size), self.video_settings, where)

    def process_videos(self, videos: list[list], fps: list[float] | None = None) -> dict:
        """Videos (each a list of PIL frames) -> {"pixel_values_videos" (patches, C * T * P * P) float32,
        "video_grid_thw" (videos, 3) long, and for Qwen2.5-VL "second_per_grid_ts" (videos,) float32}, as
        transformers' Qwen2VLVideoProcessor / Qwen2_5_VLProcessor (Qwen3VLVideoProcessor) return them; Gemma 4:
        {"pixel_values_videos" (frames, patches, P * P * C), "video_position_ids" (frames, patches, 2) long,
        "num_frames_per_video" (videos,) long}, as Gemma4VideoProcessor does (see the module docstring). Raises
        DataError for a video whose frames differ in size."""
        for frames in videos:
            sizes = {f.size for f in frames}
            if len(sizes) != 1:
                raise DataError(f"A video's frames must all have one size; got {sorted(sizes)}. Resize them first.")
        if self._pooled:
            return self._pooled_frames(videos)
        if self.soft_token_marks is not None:
            outs = [self._gemma_frames(list(frames)) for frames in videos]
            return {"pixel_values_videos": torch.cat([o["pixel_values"] for o in outs]).float(),
                    "video_position_ids": torch.cat([o["image_position_ids"] for o in outs]).long(),
                    "num_frames_per_video": torch.tensor([len(frames) for frames in videos])}
        tps = int(self.image_processor.temporal_patch_size)
        patches, grids = [], []
        for frames in videos:
            per_frame, (h, w) = self._frames_out(list(frames))
            per_frame = torch.cat([per_frame, per_frame[-1:].expand(-len(frames) % tps, *per_frame.shape[1:])])
            t = per_frame.shape[0] // tps
            grouped = per_frame.view(t, tps, h * w, *per_frame.shape[2:]).permute(0, 2, 3, 1, 4, 5)
            patches.append(grouped.reshape(t * h * w, -1))
            grids.append([t, h, w])
        out = {"pixel_values_videos": torch.cat(patches).float(), "video_grid_thw": torch.tensor(grids).long()}
        if not self.video_stamps:
            rates = [r or DEFAULT_FPS for r in fps] if fps else [DEFAULT_FPS] * len(videos)
            out["second_per_grid_ts"] = torch.tensor([tps / float(r) for r in rates])
        return out

    def video_layouts(self, videos: list, indices: list | None = None, where: str = "videos") -> list:
        """Per video ((frames, fps) pairs: frames as PIL images or sources to_pil reads, fps None for DEFAULT_FPS)
        what expand_videos needs: ((t, h, w) grid, frames padded to a multiple of temporal_patch_size; and for
        Qwen3-VL the patches' times in seconds, from the frame indices (`indices` per video, e.g. a video's
        metadata's frames_indices; else 0, 1, ...) over fps); for Gemma 4 ((frames, soft tokens a frame), each
        frame's time). Only each video's first frame is read. Raises DataError naming `where` and the video for
        indices of another length, or a video Qwen3-VL's processor refuses (qwen3_frame_size)."""
        if not videos:
            return []
        out = []
        for k, (frames, fps) in enumerate(videos):
            at = f"{where}, video {k + 1}"
            first = to_pil(frames[0], f"{at}, frame 1")
            times = [i / float(fps or DEFAULT_FPS) for i in _frame_indices(indices, k, frames, at)]
            if self.soft_token_marks is not None:  # Gemma 4: (frames, soft tokens a frame), each frame's time
                out.append(([len(frames), int(self._gemma_frames([first])["num_soft_tokens_per_image"][0])], times))
                continue
            if self._pooled:  # LLaVA-OneVision: (frames, pooled tokens a frame)
                out.append(([len(frames), math.ceil(self.video_settings["pooled"] / 2) ** 2], None))
                continue
            tps = int(self.image_processor.temporal_patch_size)
            if self.video_stamps:
                h, w = (v // int(self.image_processor.patch_size) for v in self._qwen3_size(len(frames), first, at))
                stamps = patch_stamps(times, tps)
            else:
                sizes = self.image_processor(images=[first], size=self._pixel_limits(), return_tensors="pt")
                h, w = sizes["image_grid_thw"][0].tolist()[1:]
                stamps = None
            out.append(([-(-len(frames) // tps), h, w], stamps))
        return out

    def expand_videos(self, text: str, layouts: list) -> str:
        """Each video token of `text` expanded for its video (video_layouts' entries, in order): repeated to the
        video's token count (t * h * w / merge^2), or for Qwen3-VL one timestamped run per temporal patch."""
        if self.video_token is None:
            return text
        parts = text.split(self.video_token)
        if len(parts) - 1 != len(layouts):
            raise DataError(f"The text has {len(parts) - 1} video placeholders but {len(layouts)} videos were given.")
        out = [parts[0]]
        for (grid, stamps), rest in zip(layouts, parts[1:]):
            if self.soft_token_marks is not None:  # Gemma4Processor: "mm:ss <boi><video> x n<eoi>" per frame
                begin, end = self.soft_token_marks
                out.append(" ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {begin}{self.video_token * grid[1]}{end}"
                                    for t in stamps) + rest)
                continue
            if self._pooled:  # LlavaOnevisionProcessor: frames x pooled tokens, and the newline's
                out.append(self.video_token * (grid[0] * grid[1] + 1) + rest)
                continue
            per_frame = grid[1] * grid[2] // self.merge_size ** 2
            if stamps is None:
                out.append(self.video_token * (grid[0] * per_frame) + rest)
            else:
                start, end = self.video_stamps
                out.append("".join(f"<{s:.1f} seconds>{start}{self.video_token * per_frame}{end}" for s in stamps)
                           + rest)
        return "".join(out)

    def frame_sources(self, filmed: list, where: str, base_dir: Path | None = None) -> list:
        """_split_media's (source, fps) videos -> (frame sources, fps) pairs, nothing decoded: a source is a list of
        frames (PIL images, uint8 arrays, paths, bytes; or one (T, H, W, C) array), a folder of image files (taken
        in name order) or a video file
        (data/video_file.py: its frames sampled at fps, 2 a second by default; the pair carries the rate they
        stand at). Raises DataError naming `where` for a video on a model whose videos the data pipeline does not
        read, a file that is neither a video nor a folder, an empty folder, a frame or video file that does not
        exist, or a video file that cannot be read."""
        if filmed and self.video_token is None:
            raise DataError(f"{where}: has a video item; fasttune's data pipeline reads videos for Qwen2-VL, "
                            f"Qwen2.5-VL, Qwen3-VL, Qwen3.5, Gemma 4 and LLaVA-OneVision only (other families' "
                            f"videos train through the model with the processor's pixel_values_videos and "
                            f"video_grid_thw, or pass sampled frames as images).")
        out = []
        for i, (src, fps) in enumerate(filmed):
            at = f"{where}, video {i + 1}"
            refuse_address(src, at, "video")
            if is_array_image(src) and src.ndim == 4:  # frames as one (T, H, W, C) / (T, C, H, W) array
                src = list(src)
            if isinstance(src, (str, Path)) and is_video_file(Path(src)):
                path = absolute(src, base_dir)
                if not path.is_file():
                    raise DataError(f"{at}: video file '{path}' does not exist.")
                clip = VideoFile(path, fps, where=at, sampler=self.file_sampler())
                out.append((clip, clip.rate))
                continue
            if isinstance(src, (str, Path)) and absolute(src, base_dir).is_dir():
                folder = absolute(src, base_dir)
                src = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                if not src:
                    raise DataError(f"{at}: the folder '{folder}' holds no .png / .jpg / .webp frames.")
            elif not isinstance(src, (list, tuple)) or not src:
                raise DataError(f"{at}: a video is a video file ({', '.join(VIDEO_SUFFIXES)}), its list of frames "
                                f"(images, paths or bytes) or a folder of frame images, not {src!r:.80}.")
            for j, f in enumerate(src):
                if isinstance(f, (str, Path)) and not absolute(f, base_dir).is_file():
                    raise DataError(f"{at}, frame {j + 1}: image file '{absolute(f, base_dir)}' does not exist.")
            frames = [absolute(f, base_dir) if isinstance(f, (str, Path)) else f for f in src]
            sizes = [_frame_size(f) for f in frames]
            odd = next((j for j, size in enumerate(sizes) if None not in (size, sizes[0]) and size != sizes[0]), None)
            if odd is not None:
                raise DataError(f"{at}, frame {odd + 1}: a video's frames must all have one size; it is "
                                f"{sizes[odd][0]} x {sizes[odd][1]}, frame 1 is {sizes[0][0]} x {sizes[0][1]} (width "
                                f"x height). Resize them first.")
            out.append((frames, fps))
        return out

    def video_sources(self, filmed: list, where: str, base_dir: Path | None = None) -> list:
        """frame_sources, each frame decoded: (PIL frames, fps) pairs. Raises what frame_sources raises, and
        DataError naming `where` for an unreadable frame."""
        return decoded(self.frame_sources(filmed, where, base_dir), where)

    def sample_sources(self, sources: list, indices: list, where: str = "videos") -> tuple[list, list]:
        """A processor call's frame_sources pairs sampled as transformers' video processor samples given frames
        (do_sample_frames): Qwen3-VL / Qwen3.5 (Qwen3VLVideoProcessor.sample_frames): int(frames / fps_given x fps)
        frames, within [min_frames, max_frames] and at most all, at the rounded evenly spaced indices; Gemma 4 and
        LLaVA-OneVision (the default sampler; OneVision without num_frames or fps: 2 frames a second): num_frames at
        index k x frames // num_frames, all of them when there are fewer (where transformers raises). The frames'
        rate is their metadata's (24 a second without). Video files (already sampled by data/video_file.py) are
        kept. Returns (pairs, frame indices per video for the timestamps).
        Raises DataError for Qwen2-VL / Qwen2.5-VL (whose processor does not sample by default: sample first)."""
        out, seen = [], []
        for k, (frames, fps) in enumerate(sources):
            given = _frame_indices(indices, k, frames, f"{where}, video {k + 1}")
            if isinstance(frames, VideoFile):  # (picked when it was opened)
                picked = list(range(len(frames)))
            elif self.soft_token_marks is not None or self.video_stamps or self._pooled:
                picked = self.sampled_indices(len(frames), float(fps or DEFAULT_FPS))
            else:
                raise DataError("do_sample_frames=True: fasttune's Qwen2-VL / Qwen2.5-VL processor takes a video's "
                                "frames as sampled; sample them first and pass them with their video_metadata.")
            out.append(([frames[i] for i in picked] if not isinstance(frames, VideoFile) else frames, fps))
            seen.append([given[i] for i in picked])
        return out, seen

    def sampled_indices(self, total: int, rate: float, fps: float | None = None) -> list[int]:
        """The frames (indices among `total` at `rate` frames a second) the family's transformers video processor
        keeps (its sample_frames): Gemma 4 and LLaVA-OneVision (BaseVideoProcessor's) num_frames, or total / rate x
        fps frames with an `fps`, at arange(0, total, total / n) truncated, all of them when there are fewer (where
        transformers raises); Qwen3-VL / Qwen3.5 total / rate x fps frames (fps: `fps` or the settings', 2),
        within [min_frames, max_frames] and at most all, at the rounded evenly spaced indices."""
        s = self.video_settings or {}
        if self.soft_token_marks is not None or self._pooled:
            n = int(total / rate * fps) if fps is not None else \
                s.get("num_frames") or int(total / rate * s.get("fps", 2.0))
            n = max(1, n)
            return torch.arange(0, total, total / n).int().tolist() if n < total else list(range(total))
        fps = fps if fps is not None else s.get("fps", 2.0)
        n = min(max(int(total / rate * fps), s.get("min_frames", 4)), s.get("max_frames", 768), total)
        return np.linspace(0, total - 1, n).round().astype(int).tolist()

    def file_sampler(self):
        """How a video file's frames are picked (data/video_file.py's `sampler`): as the family's transformers video
        processor picks them from a decoded file when it samples by default (do_sample_frames in the video settings:
        Qwen3-VL / Qwen3.5, Gemma 4), sampled_indices over the file's frame count and rate; None otherwise
        (Qwen2-VL / Qwen2.5-VL: 2 a second, qwen-vl-utils' rule)."""
        if not (self.video_settings or {}).get("do_sample_frames") or \
                (self.soft_token_marks is None and not self.video_stamps):
            return None
        return self.sampled_indices


def _frame_indices(indices: list | None, k: int, frames, at: str) -> list:
    """Video k's frame indices in its source (`indices[k]`, a metadata's frames_indices; else a video file's own
    frames_indices when its family picked them; else 0 .. len(frames) - 1). Raises DataError naming `at` when they
    are not one per frame."""
    count = len(frames)
    own = getattr(frames, "frames_indices", None)
    given = list(indices[k]) if indices and indices[k] is not None else list(own if own is not None else range(count))
    if len(given) != count:
        raise DataError(f"{at}: its metadata's frames_indices has {len(given)} entries for {count} frames; give one "
                        f"index per frame given.")
    return given


def _frame_size(frame) -> tuple[int, int] | None:
    """A frame source's (width, height) without decoding it (a file's header, a PIL image's or an array's shape);
    None when it cannot be told cheaply (its decoding names the fault later)."""
    from PIL import Image

    if isinstance(frame, Path):
        try:
            with Image.open(frame) as im:
                return im.size
        except OSError:
            return None
    if isinstance(frame, Image.Image):
        return frame.size
    if is_array_image(frame) and frame.ndim in (2, 3):  # as to_pil reads it
        h, w = frame.shape[1:3] if channels_first(frame.shape) else frame.shape[:2]
        return int(w), int(h)
    return None


def decoded(sources: list, where: str) -> list:
    """(frame sources, fps) pairs -> (PIL frames, fps) pairs, each frame decoded (video files through PyAV). Raises
    DataError naming `where`, the video and the frame for an unreadable one."""
    return [([to_pil(f, f"{where}, video {i + 1}, frame {j + 1}") for j, f in enumerate(frames)], fps)
            for i, (frames, fps) in enumerate(sources)]


def video_rate(item: dict, where: str) -> float | None:
    """A video item's "fps" (frames a second of its frames; for a video file, the rate to sample it at), None when
    absent (DEFAULT_FPS for frames, FILE_FPS for a file); DataError for a value that is not a positive number."""
    return None if item.get("fps") is None else positive_number(item["fps"], where, "a video's 'fps'")


def video_list(videos) -> list:
    """A processor's `videos` argument as a list of videos, as transformers' make_batched_videos reads it: one path,
    one (T, H, W, C) array or one list of frames (PIL images or image arrays) is a single video; a list of paths,
    arrays or frame lists is several."""
    if videos is None:
        return []
    if isinstance(videos, (str, Path)) or (is_array_image(videos) and videos.ndim == 4):
        return [videos]
    from PIL import Image

    videos = list(videos)
    frame = lambda v: isinstance(v, Image.Image) or (is_array_image(v) and v.ndim == 3)  # noqa: E731
    return [videos] if videos and all(frame(v) for v in videos) else videos
