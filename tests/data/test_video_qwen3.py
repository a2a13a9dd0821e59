"""Videos in data rows, prompts and processor calls for Qwen3-VL / Qwen3.5 (data/video.py's timestamped layout):
text, pixels and grids equal transformers' Qwen3VLProcessor with do_sample_frames=False
(tests/fixtures/qwen3vl_video.npz, written by that processor where torchvision is installed), the frame size from
the frame count (and qwen-vl-utils' per-frame cap), rows with videos train and their logits equal transformers'
Qwen3-VL on the same batch, and the bad inputs are named."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vision import (QWEN3_VIDEO, QWEN3_VIDEO_SIZE, check_video_batch, patterned_frames, qwen3_vl_config,
                         qwen3_vl_video_processor, save_video_model)

from fasttune.data.video import QWEN3_VIDEO_SIZE as DEFAULT_SIZE, qwen3_frame_size
from fasttune.errors import DataError

ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3vl_video.npz"
SIZE, VIDEO = QWEN3_VIDEO_SIZE, QWEN3_VIDEO  # as the oracle's video processor
_processor = qwen3_vl_video_processor


def _frames(array):
    return [Image.fromarray(f) for f in array]


def test_text_and_frames_equal_transformers_processor():
    oracle = np.load(ORACLE)
    proc = _processor()
    text = "ab<|vision_start|><|video_pad|><|vision_end|>cd<|vision_start|><|video_pad|><|vision_end|>e"
    out = proc(text=[text], videos=[_frames(oracle["frames4"]), _frames(oracle["frames3"])],
               video_metadata=[{"fps": 2.0}, {"fps": 24.0, "frames_indices": [0, 1, 2]}], do_sample_frames=False)
    assert out["input_ids"].tolist() == oracle["input_ids"].tolist()  # timestamps: <0.2 seconds>, <1.2 seconds>, ...
    torch.testing.assert_close(out["pixel_values_videos"], torch.from_numpy(oracle["pixel_values_videos"]),
                               rtol=0, atol=1e-5)
    assert out["video_grid_thw"].tolist() == oracle["video_grid_thw"].tolist()
    assert "second_per_grid_ts" not in out  # (Qwen2.5-VL's; Qwen3-VL's processor has none)
    resized = [Image.new("RGB", (50, 100), "red")] * 8  # 8 frames of 100 x 50: resized to the processor's size
    assert proc.video_layouts([(resized, None)])[0][0] == oracle["resized_grid"][0].tolist()
    assert proc.process_videos([resized])["video_grid_thw"].tolist() == oracle["resized_grid"].tolist()


def test_given_frames_sampled_by_default_as_transformers():
    """Qwen3VLVideoProcessor samples given frames by default (2 a second of frames taken as 24 a second without
    metadata, at least 4): 10 frames -> frames 0, 3, 6, 9, their timestamps from those indices."""
    oracle = np.load(ORACLE)
    proc = _processor()
    proc.video_settings = {**proc.video_settings, "do_sample_frames": True, "fps": 2.0, "min_frames": 4,
                           "max_frames": 768}  # (the defaults a checkpoint folder without them gets)
    frames = _frames(patterned_frames(10, 32, 64))
    out = proc(text=["a<|vision_start|><|video_pad|><|vision_end|>b"], videos=[frames])
    assert out["input_ids"].tolist() == oracle["sampled_ids"].tolist()
    assert out["video_grid_thw"].tolist() == oracle["sampled_grid"].tolist() == [[2, 2, 4]]
    torch.testing.assert_close(out["pixel_values_videos"], torch.from_numpy(oracle["sampled_pixels"]), rtol=0,
                               atol=1e-5)
    kept = proc(text=["a<|vision_start|><|video_pad|><|vision_end|>b"], videos=[frames], do_sample_frames=False)
    assert kept["video_grid_thw"].tolist() == [[5, 2, 4]]  # asked not to: all ten


def test_frame_size_from_the_frame_count_and_the_cap():
    """Qwen3VLVideoProcessor's smart_resize counts t x h x w against the budget, so more frames shrink each; with
    cap_pixels_per_frame (qwen-vl-utils) a frame also stays within max_video_tokens patches."""
    size = dict(DEFAULT_SIZE)  # (the values: transformers 5.24's smart_resize / get_num_of_video_patches)
    assert qwen3_frame_size(4, 720, 1280, 32, 2, size) == (320, 576)
    assert qwen3_frame_size(64, 720, 1280, 32, 2, size) == (64, 128)  # 64 frames share the budget
    assert qwen3_frame_size(2, 20, 40, 32, 2, size) == (192, 384)  # tiny frames grow to the lower bound
    big = {**size, "longest_edge": 32 * 32 * 24576}
    assert qwen3_frame_size(4, 720, 1280, 32, 2, big) == (704, 1280)  # within the budget: rounded to 32
    assert qwen3_frame_size(4, 720, 1280, 32, 2, {**big, "max_video_tokens": 768}) == (640, 1152)  # 2 x 40 x 72
    with pytest.raises(DataError, match="at least 2 frames"):
        qwen3_frame_size(1, 64, 64, 32, 2, size)
    with pytest.raises(DataError, match="aspect ratio"):
        qwen3_frame_size(2, 32, 32 * 201, 32, 2, size)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    from transformers import Qwen3VLForConditionalGeneration

    from fasttune import FastVisionModel

    folder = save_video_model(tmp_path_factory.mktemp("video3") / "m", Qwen3VLForConditionalGeneration,
                              qwen3_vl_config(), _processor())
    return (*FastVisionModel.from_pretrained(str(folder), dtype=torch.float32), folder)


def test_video_rows_train_and_equal_transformers(video_model, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc, folder = video_model
    loaded = {**VIDEO, "do_sample_frames": True, "fps": 2.0, "min_frames": 4, "max_frames": 768}  # (+ sampling)
    assert proc.video_stamps == ("<|vision_start|>", "<|vision_end|>") and proc.video_settings == loaded
    oracle = np.load(ORACLE)
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": _frames(oracle["frames4"]),
                                                        "fps": 2}, {"type": "text", "text": "what happens?"}]},
                          {"role": "assistant", "content": "it moves"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "and"},
                                                       {"type": "video", "video": _frames(oracle["frames3"])}]},
                          {"role": "assistant", "content": "still"}]}]
    enc = VisionEncoder(proc, 256, train_on_responses_only=True, base_dir=tmp_path)
    examples = [enc.encode(r, i) for i, r in enumerate(rows)]
    first = proc.tokenizer.decode(examples[0]["input_ids"])
    assert "<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|><1.2 seconds>" in first
    for ex in examples:  # two frames' runs of h * w / merge^2 = 2 video tokens, none a target
        assert ex["input_ids"].count(proc.video_token_id) == 4
        assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t == proc.video_token_id)
    batch = collate_vision(examples, proc)
    assert batch["video_grid_thw"].tolist() == [[2, 2, 4], [2, 2, 4]] and "second_per_grid_ts" not in batch
    hf = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    check_video_batch(model, hf, proc, batch, [{"type": "video", "video": _frames(oracle["frames4"])},
                                               {"type": "text", "text": "next?"}], pad_token_id=256)
    proc.save_pretrained(tmp_path / "saved")
    from fasttune.data.video import read_video_settings

    assert read_video_settings(tmp_path / "saved") == loaded
    again = proc.with_tokenizer(proc.tokenizer)  # (what an adapter folder's tokenizer gets wrapped in)
    assert (again.video_token, again.video_settings, again.video_stamps) == (proc.video_token, loaded,
                                                                             proc.video_stamps)
    from fasttune import FastVisionModel

    lora = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, use_gradient_checkpointing=False)
    lora(**batch).loss.backward()  # the videos' gradients reach the tower's adapters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters()
               if "visual" in n and "lora_B" in n)


def test_bad_video_inputs_are_named(video_model):
    _, proc, _ = video_model
    red = [Image.new("RGB", (64, 32), "red")] * 2
    text = "<|vision_start|><|video_pad|><|vision_end|>"
    with pytest.raises(DataError, match="video_metadata has 2 entries for 1 videos"):
        proc(text=[text], videos=[red], video_metadata=[{"fps": 2}, {"fps": 2}])
    with pytest.raises(DataError, match="frames_indices has 3 entries for 2 frames"):
        proc(text=[text], videos=[red], video_metadata=[{"fps": 2, "frames_indices": [0, 4, 8]}])
    with pytest.raises(DataError, match="video_metadata 1.*fps"):
        proc(text=[text], videos=[red], video_metadata=[{"fps": -1}])
    with pytest.raises(DataError, match="videos, video 1: a Qwen3-VL video needs at least 2 frames"):
        proc(text=[text], videos=[red[:1]])
    from fasttune.data.vision_rows import VisionEncoder

    row = {"messages": [{"role": "user", "content": [{"type": "video", "video": red[:1]}]}]}
    with pytest.raises(DataError, match="Row 3, video 1: a Qwen3-VL video needs at least 2 frames"):
        VisionEncoder(proc, 256, False).encode(row, 3)
