"""A video file for the families whose transformers video processor samples by default (Qwen3-VL / Qwen3.5,
Gemma 4): the frames it picks from the decoded file and their times, as transformers' own processors make them
(tests/fixtures/video_file_sampling.npz and the two lossless clips beside it, written by
tests/fixtures/make_video_file_sampling.py), through processor calls and data rows."""
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_vision import gemma4_video_processor, qwen3_vl_video_processor

pytest.importorskip("av")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TEXT = {"qwen3": "a<|vision_start|><|video_pad|><|vision_end|>b", "gemma4": "a<|video|>b"}


def _processor(family):
    if family == "qwen3":  # the defaults a checkpoint folder without its own video settings gets
        proc = qwen3_vl_video_processor()
        proc.video_settings = {**proc.video_settings, "do_sample_frames": True, "fps": 2.0, "min_frames": 4,
                               "max_frames": 768}
    else:
        proc = gemma4_video_processor()
        proc.video_settings = {**proc.video_settings, "do_sample_frames": True, "num_frames": 32}
    return proc


@pytest.mark.parametrize("family, clip", [("qwen3", "clip45"), ("qwen3", "clip6"), ("gemma4", "clip45")])
def test_file_sampled_and_timed_as_transformers(family, clip, tmp_path):
    """The picked frames (e.g. Qwen3-VL: 2 a second of 45 frames at 15 a second -> 0, 9, 18, 26, 35, 44; Gemma 4:
    32 of 45 at arange(0, 45, 45 / 32)), the prompt's tokens with their timestamps and the pixels equal
    transformers'; a data row with the file gives the same tokens and pixels."""
    from fasttune.data.video_file import VideoFile
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    oracle = np.load(FIXTURES / "video_file_sampling.npz")
    key, path, proc = f"{family}_{clip}", FIXTURES / f"{clip}.avi", _processor(family)
    assert VideoFile(path, sampler=proc.file_sampler()).frames_indices == oracle[f"{key}_indices"].tolist()
    out = proc(text=[TEXT[family]], videos=[str(path)])
    assert out["input_ids"].tolist() == oracle[f"{key}_ids"].tolist()
    torch.testing.assert_close(out["pixel_values_videos"].double().sum(),
                               torch.tensor(float(oracle[f"{key}_pixel_sum"]), dtype=torch.float64), rtol=1e-6,
                               atol=1e-3)
    row = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(path)}]},
                        {"role": "assistant", "content": "frames"}]}
    example = VisionEncoder(proc, 4096, False, base_dir=tmp_path).encode(row, 0)
    video = oracle[f"{key}_ids"][0].tolist()
    inner = video[1:-1]  # the prompt's video part, without the text around it ("a" ... "b")
    ids = example["input_ids"]
    assert any(ids[i:i + len(inner)] == inner for i in range(len(ids)))
    batch = collate_vision([example], proc)
    assert torch.equal(batch["pixel_values_videos"], out["pixel_values_videos"])


def test_without_sampling_the_qwen2_rule_stays():
    """Qwen2-VL / Qwen2.5-VL's processors do not sample: a file keeps qwen-vl-utils' 2 a second (k / 2 seconds)."""
    from tiny_vision import qwen_vl_video_processor

    from fasttune.data.video_file import VideoFile

    proc = qwen_vl_video_processor()
    assert proc.file_sampler() is None
    clip = VideoFile(FIXTURES / "clip45.avi", sampler=proc.file_sampler())
    assert clip.rate == 2.0 and clip.frames_indices is None and clip.indices == [0, 8, 15, 22, 30, 38]
