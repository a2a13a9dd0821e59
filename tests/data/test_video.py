"""Videos in data rows and prompts (data/video.py) for Qwen2-VL / Qwen2.5-VL: frames through the checkpoint's image
processor equal transformers' Qwen2VLVideoProcessor (tests/fixtures/qwen2vl_video.npz, written by that processor
where torchvision is installed); rows with videos expand to the processor's token counts, their logits equal
transformers' on the same batch, a training step runs; and the bad inputs are named."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vision import QWEN_VIDEO_SIZE, check_video_batch, qwen_vl_config, qwen_vl_video_processor, save_video_model

from fasttune.errors import DataError

ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2vl_video.npz"
SIZE = QWEN_VIDEO_SIZE  # as the oracle's video processor
_processor = qwen_vl_video_processor


def _frames(array):
    return [Image.fromarray(f) for f in array]


def test_frames_equal_transformers_video_processor():
    oracle = np.load(ORACLE)
    proc = _processor()
    out = proc.process_videos([_frames(oracle["frames4"]), _frames(oracle["frames3"])], [24.0, 2.0])
    torch.testing.assert_close(out["pixel_values_videos"], torch.from_numpy(oracle["pixel_values_videos"]),
                               rtol=0, atol=1e-5)
    assert out["video_grid_thw"].tolist() == oracle["video_grid_thw"].tolist()  # (3 frames: the last repeated)
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / 24, 1.0])  # temporal_patch_size / fps
    assert proc.video_layouts([(_frames(oracle["frames4"]), None)]) == [([2, 2, 4], None)]
    ip = proc.image_processor  # a video config's own normalisation (here the images' values) passes through
    proc.video_settings = {**SIZE, "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}
    again = proc.process_videos([_frames(oracle["frames4"]), _frames(oracle["frames3"])], [24.0, 2.0])
    assert torch.equal(again["pixel_values_videos"], out["pixel_values_videos"])
    assert proc.video_layouts([(_frames(oracle["frames4"]), None)]) == [([2, 2, 4], None)]


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fasttune import FastVisionModel

    folder = save_video_model(tmp_path_factory.mktemp("video") / "m", Qwen2_5_VLForConditionalGeneration,
                              qwen_vl_config(), _processor())
    return (*FastVisionModel.from_pretrained(str(folder), dtype=torch.float32), folder)


def test_video_rows_expand_train_and_equal_transformers(video_model, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc, folder = video_model
    assert proc.video_token == "<|video_pad|>" and proc.video_settings == SIZE  # read back from the checkpoint
    proc.save_pretrained(tmp_path / "saved")  # and written with the processor
    assert json.loads((tmp_path / "saved" / "video_preprocessor_config.json").read_text()) == {"size": SIZE}
    oracle = np.load(ORACLE)
    for i, frame in enumerate(oracle["frames3"]):
        Image.fromarray(frame).save(tmp_path / f"f{i}.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": _frames(oracle["frames4"]),
                                                        "fps": 4}, {"type": "text", "text": "what happens?"}]},
                          {"role": "assistant", "content": "it moves"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "video"}]},
                          {"role": "assistant", "content": "still"}], "videos": ["."]}]  # a folder of frames
    enc = VisionEncoder(proc, 256, train_on_responses_only=True, base_dir=tmp_path)
    examples = [enc.encode(r, i) for i, r in enumerate(rows)]
    for ex in examples:  # one run of t * h * w / merge^2 = 2 * 2 * 4 / 4 video tokens, none a target
        assert ex["input_ids"].count(proc.video_token_id) == 4
        assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t == proc.video_token_id)
    batch = collate_vision(examples, proc)
    assert batch["video_grid_thw"].tolist() == [[2, 2, 4], [2, 2, 4]]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([0.5, 2 / 24])
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    check_video_batch(model, hf, proc, batch, [{"type": "video", "video": _frames(oracle["frames4"])},
                                               {"type": "text", "text": "next?"}], pad_token_id=256)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}])
    called = proc(text=[text], videos=[_frames(oracle["frames4"])])  # the processor's own call, as transformers'
    assert called["input_ids"][0].tolist().count(proc.video_token_id) == 4
    assert torch.equal(called["pixel_values_videos"], batch["pixel_values_videos"][:16])  # (2 x 2 x 4 patches)
    with pytest.raises(DataError, match="0 images, 0 audio clips and 1 videos were given for 0 image, 0 audio and 0 "):
        proc(text=["no placeholder"], videos=[_frames(oracle["frames4"])])
    from fasttune import FastVisionModel

    lora = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, use_gradient_checkpointing=False)
    lora(**batch).loss.backward()  # the videos' gradients reach the tower's adapters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters()
               if "visual" in n and "lora_B" in n)


def test_bad_videos_are_named(video_model, tmp_path):
    from fasttune.data.vision_rows import VisionEncoder

    _, proc, _ = video_model
    enc = VisionEncoder(proc, 256, train_on_responses_only=False, base_dir=tmp_path)

    def row(**item):
        return {"messages": [{"role": "user", "content": [{"type": "video", **item}]}]}

    red, blue = Image.new("RGB", (56, 28), "red"), Image.new("RGB", (28, 28), "blue")
    with pytest.raises(DataError, match="Row 0, video 1: video file .*clip.mp4' does not exist"):
        enc.encode(row(video="clip.mp4"), 0)
    with pytest.raises(DataError, match="Row 0, video 1: a video is a video file .*not 'notes.txt'"):
        enc.encode(row(video="notes.txt"), 0)
    with pytest.raises(DataError, match="Row 1, message 1: a video's 'fps' must be a positive number, not 0"):
        enc.encode(row(video=[red, red], fps=0), 1)
    with pytest.raises(DataError, match="Row 2.*'videos' column has no video left"):
        enc.encode(row(), 2)
    with pytest.raises(DataError, match="do_sample_frames=True: .*Qwen2-VL / Qwen2.5-VL processor .*sample them"):
        proc(text=["<|video_pad|>"], videos=[[red, red]], do_sample_frames=True)  # (not its processor's default)
    with pytest.raises(DataError, match="frames must all have one size"):
        proc.process_videos([[red, blue]])
    red.save(tmp_path / "r.png")
    blue.save(tmp_path / "b.png")
    with pytest.raises(DataError, match="Row 5, video 1, frame 2: a video's frames must all have one size; it is 28 x "
                                        "28, frame 1 is 56 x 28"):  # (named when the row is read, from the headers)
        enc.encode(row(video=["r.png", "b.png"]), 5)
    with pytest.raises(DataError, match="Row 2, video 1, frame 2: image file .*gone.png' does not exist"):
        enc.encode(row(video=[red, "gone.png"]), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Row 3, video 1: the folder .*empty' holds no .png"):
        enc.encode(row(video="empty"), 3)
    gemma = _processor()
    gemma.video_token = None  # a processor whose model's videos the pipeline does not read
    with pytest.raises(DataError, match="Row 4: has a video item; .*Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, "
                                        "Gemma 4 and LLaVA-OneVision only"):
        VisionEncoder(gemma, 256, False).encode(row(video=[red]), 4)
