"""Video files in data rows, prompts and processor calls (data/video_file.py, through PyAV): frames sampled at the
item's fps (2 a second by default), nearest to k / fps seconds, at most max_frames (the rate lowered to fit); a file
gives the same tokens and pixels as its sampled frames given as a list at that rate; and the bad files are named."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fasttune.errors import DataError

av = pytest.importorskip("av")
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def _write(path, frames: int = 25, rate: int = 10, size=(64, 32)):
    """A video of `frames` solid frames at `rate` frames a second, frame n in COLOURS[n % 3] (MPEG-4 part 2)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for n in range(frames):
            image = np.zeros((size[1], size[0], 3), np.uint8) + np.array(COLOURS[n % 3], np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _colour(frame) -> int:
    return int(np.argmax(np.asarray(frame, np.float32).mean((0, 1))))


def test_frames_sampled_at_the_rate(tmp_path):
    from fasttune.data.video_file import VideoFile

    clip = VideoFile(_write(tmp_path / "a.mp4"))  # 2.5 s at 10 fps, sampled at 2: frames 0, 5, 10, 15, 20
    assert len(clip) == 5 and clip.rate == 2.0 and clip.indices == [0, 5, 10, 15, 20]
    assert [_colour(f) for f in clip] == [0, 2, 1, 0, 2]  # (frame n is COLOURS[n % 3]: the right frames decoded)
    assert clip[0].size == (64, 32) and _colour(clip[0]) == 0
    faster = VideoFile(tmp_path / "a.mp4", fps=4)  # at 4 a second: 0, 2.5 -> 2 (rounded half to even), 5, ...
    assert len(faster) == 10 and faster.indices[:3] == [0, 2, 5]
    capped = VideoFile(tmp_path / "a.mp4", fps=10, max_frames=4)  # 25 frames wanted, 4 allowed: 1.6 a second
    assert len(capped) == 4 and capped.rate == pytest.approx(1.6) and capped.indices == [0, 6, 12, 19]
    short = VideoFile(_write(tmp_path / "b.mp4", frames=3), fps=2)  # 0.3 s: still two frames (a temporal patch)
    assert len(short) == 2


def test_a_file_equals_its_frames_given_as_a_list(tmp_path):
    from tiny_vision import qwen_vl_video_processor

    from fasttune.data.video_file import VideoFile

    proc = qwen_vl_video_processor()
    path = _write(tmp_path / "a.mp4", size=(56, 28))
    frames = [Image.fromarray(np.asarray(f)) for f in VideoFile(path)]
    text = "ab<|vision_start|><|video_pad|><|vision_end|>c"
    from_file = proc(text=[text], videos=[str(path)])
    from_frames = proc(text=[text], videos=[frames], video_metadata=[{"fps": 2.0}])
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(from_file[key], from_frames[key]), key
    row = {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4", "fps": 2}]},
                        {"role": "assistant", "content": "colours"}]}
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    example = VisionEncoder(proc, 256, False, base_dir=tmp_path).encode(row, 0)
    assert isinstance(example["videos"][0][0], VideoFile)  # (kept undecoded until its batch is collated)
    batch = collate_vision([example], proc)
    assert torch.equal(batch["pixel_values_videos"], from_file["pixel_values_videos"])
    assert batch["video_grid_thw"].tolist() == [[3, 2, 4]]  # 5 frames, padded to 6: 3 temporal patches


def test_bad_video_files_are_named(tmp_path, monkeypatch):
    from fasttune.data.video_file import VideoFile

    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(DataError, match="Row 2, video 1: cannot read the video file .*broken.mp4"):
        VideoFile(tmp_path / "broken.mp4", where="Row 2, video 1")
    from tiny_vision import qwen_vl_video_processor

    with pytest.raises(DataError, match="videos, video 1: 'https://example.com/a.mp4' is a web address"):
        qwen_vl_video_processor()(text=["<|video_pad|>"], videos="https://example.com/a.mp4")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(DataError, match="Row 3: .*a.mp4' is a video file; reading video files needs PyAV"):
        VideoFile(tmp_path / "a.mp4", where="Row 3")
