"""Video files (.mp4, .mov, .mkv, .webm, ...) read through PyAV (FFmpeg's libraries; `pip install av`, or the
`video` extra): a file stands for its frames sampled at a rate, as qwen-vl-utils and transformers' video processors
sample them.

Where the family's transformers video processor samples by default (Qwen3-VL / Qwen3.5, Gemma 4: do_sample_frames),
a file's frames are the ones it picks from the decoded file (data/video.py's file_sampler: its sample_frames over
the file's frame count and rate, the item's "fps" passed as its fps), timed as it times them (frame index over the
file's rate). Otherwise (Qwen2-VL / Qwen2.5-VL, whose processors take every frame of a file, where qwen-vl-utils
samples): the rate is the item's "fps" (default 2 frames a second, qwen-vl-utils' FPS), at
most MAX_FRAMES frames (qwen-vl-utils' VIDEO_MAX_FRAMES and Qwen3VLVideoProcessor's max_frames; a longer video is
sampled more sparsely, the rate lowered to fit) and at least two when the file has two (Qwen3-VL's temporal patch).
Frame k is the decoded frame nearest to k / rate seconds (index round(k x the file's rate / rate), in decoding order,
as transformers' sample_frames rounds its evenly spaced indices); the frames then stand as frames given at that rate
(data/video.py): their times are k / rate. Nothing is decoded until the frames are read: the first frame alone for a
row's token count, all of them when a batch is collated.
"""
from __future__ import annotations

import math
from pathlib import Path

from fasttune.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpeg", ".mpg", ".gif")
FILE_FPS = 2.0  # frames a second taken from a file without "fps" (qwen-vl-utils' FPS)
MAX_FRAMES = 768  # frames at most from one file (qwen-vl-utils' VIDEO_MAX_FRAMES)


def is_video_file(path: Path) -> bool:
    """Whether `path` names a video file by its suffix (VIDEO_SUFFIXES)."""
    return path.suffix.lower() in VIDEO_SUFFIXES


def _av(where: str, path: Path):
    """PyAV, imported; DataError naming `where` and the way to install it when it is missing."""
    try:
        import av
    except ImportError:
        raise DataError(f"{where}: '{path}' is a video file; reading video files needs PyAV (pip install av, or "
                        f"pip install 'fasttune[video]'). Or give the video as its frames: a folder of images or a "
                        f"list of them, with their rate as 'fps'.") from None
    return av


class VideoFile:
    """A video file's sampled frames as a lazy sequence of PIL images (len, [i], iteration decode the file as
    needed). `path`: the file; `fps`: frames a second to take (None: FILE_FPS); `max_frames`: at most this many;
    `where`: names the row / prompt in errors; `sampler`: None for the rule above, or a family's pick as its
    transformers video processor makes it from a decoded file ((frame count, the file's rate, fps or None) ->
    indices). `.rate` is the rate the frames stand at (frames a second): frame k at k / rate seconds, or, with a
    sampler, the file's rate and `.frames_indices` the picked frames' indices (a frame at index / rate seconds, as
    transformers times them); `.frames_indices` is None without a sampler. Raises DataError naming `where` and the
    file when PyAV is missing, or the file cannot be read or has no video."""

    def __init__(self, path: Path, fps: float | None = None, max_frames: int = MAX_FRAMES, where: str = "a video",
                 sampler=None):
        self.path, self.where = Path(path), where
        av = _av(where, self.path)
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise DataError(f"{where}: '{self.path}' has no video stream.")
                stream = container.streams.video[0]
                source_fps = float(stream.average_rate or stream.guessed_rate or 0)
                if stream.duration is not None and stream.time_base is not None:
                    duration = float(stream.duration * stream.time_base)
                else:
                    duration = (container.duration or 0) / 1e6  # (microseconds)
                count = stream.frames or round(duration * source_fps)
        except av.error.FFmpegError as e:
            raise DataError(f"{where}: cannot read the video file '{self.path}' ({e}).") from None
        if count < 1 or source_fps <= 0 or duration <= 0:
            raise DataError(f"{where}: the video file '{self.path}' holds no frames that can be timed.")
        self.source_fps, self.count, self.frames_indices = source_fps, count, None
        if sampler is not None:  # the family's processor's pick, timed by the file's own rate
            self.rate = source_fps
            self.indices = self.frames_indices = [int(i) for i in sampler(count, source_fps, fps)]
            return
        rate = FILE_FPS if fps is None else float(fps)
        planned = math.floor(duration * rate + 1e-6)
        wanted = min(max(planned, min(2, count)), max_frames)  # (a long video: fewer frames, further apart)
        if wanted != planned:
            rate = wanted / duration
        self.rate = rate
        self.indices = [min(round(k * source_fps / rate), count - 1) for k in range(wanted)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self._decode(self.indices[:i + 1] if i >= 0 else self.indices)[i]

    def __iter__(self):
        return iter(self._decode(self.indices))

    def _decode(self, indices: list[int]) -> list:
        """The frames at decoding-order `indices` (sorted, repeats allowed) as RGB PIL images; the file's last frame
        stands in for indices past its end (a container whose frame count overstates its stream)."""
        av = _av(self.where, self.path)
        wanted, out, last = sorted(indices), [], None
        try:
            with av.open(str(self.path)) as container:
                for n, frame in enumerate(container.decode(video=0)):
                    while len(out) < len(wanted) and wanted[len(out)] == n:
                        out.append(frame.to_image().convert("RGB"))
                    last = frame
                    if len(out) == len(wanted):
                        break
        except av.error.FFmpegError as e:
            raise DataError(f"{self.where}: cannot decode the video file '{self.path}' ({e}).") from None
        if last is None:
            raise DataError(f"{self.where}: the video file '{self.path}' decodes to no frames.")
        tail = last.to_image().convert("RGB")
        return out + [tail] * (len(wanted) - len(out))
