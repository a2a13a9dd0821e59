"""Videos in data rows, prompts and processor calls for Gemma 4 (data/video.py): text, pixels and positions equal
transformers' Gemma4Processor with do_sample_frames=False (tests/fixtures/gemma4_video.npz, written by it where
torchvision is installed; the video processor's own soft-token budget, not the images'), rows with videos train and
their logits and greedy generation equal transformers' Gemma 4 on the same batch."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vision import check_video_batch, gemma4_config, gemma4_video_processor, patterned_frames, save_video_model

ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "gemma4_video.npz"
_processor = gemma4_video_processor


def _frames(array):
    return [Image.fromarray(f) for f in array]


def test_text_and_frames_equal_transformers_processor():
    oracle = np.load(ORACLE)
    proc = _processor()
    assert proc.video_token_id == 265
    clips = [_frames(patterned_frames(3, 288, 480)), _frames(patterned_frames(2, 288, 480)[::-1])]
    out = proc(text=["ab<|video|>cd<|video|>e"], videos=clips, video_metadata=[{"fps": 0.5}, {"fps": 24}])
    assert out["input_ids"].tolist() == oracle["input_ids"].tolist()  # "00:00 <|image>...<image|> 00:02 ..."
    pixels = out["pixel_values_videos"] * 255  # (frames' bytes / 255: Gemma 4 normalises with mean 0, std 1)
    assert (pixels - pixels.round()).abs().max() < 1e-3
    pixels = pixels.round().long()
    assert torch.equal(pixels[:, :40], torch.from_numpy(oracle["pixel_head"]).long())
    assert torch.equal(pixels.sum(2), torch.from_numpy(oracle["pixel_patch_sums"]))
    assert torch.equal(pixels.sum(1), torch.from_numpy(oracle["pixel_position_sums"]))
    assert torch.equal(out["video_position_ids"], torch.from_numpy(oracle["video_position_ids"]).long())
    assert out["num_frames_per_video"].tolist() == oracle["num_frames_per_video"].tolist() == [3, 2]
    small = _frames(patterned_frames(2, 100, 50))  # resized to the budget: 55 soft tokens a frame, as transformers'
    assert proc.video_layouts([(small, 2.0)]) == [([2, int(oracle["small_soft_tokens"][0])], [0.0, 0.5])]


def test_given_frames_sampled_by_default_as_transformers():
    """Gemma4VideoProcessor samples given frames by default: 32 of 40, at k x 40 // 32 (and their times)."""
    oracle = np.load(ORACLE)
    proc = _processor()
    proc.video_settings = {**proc.video_settings, "do_sample_frames": True, "num_frames": 32}
    out = proc(text=["a<|video|>b"], videos=[_frames(patterned_frames(40, 288, 480))])
    assert out["input_ids"].tolist() == oracle["sampled_ids"].tolist()
    assert out["num_frames_per_video"].tolist() == [32]
    sums = (out["pixel_values_videos"] * 255).round().sum((1, 2))
    assert torch.equal(sums.double(), torch.from_numpy(oracle["sampled_frame_sums"]).double())
    few = proc(text=["a<|video|>b"], videos=[_frames(patterned_frames(5, 48, 64))])
    assert few["num_frames_per_video"].tolist() == [5]  # fewer than 32: all kept (transformers raises)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    from transformers import Gemma4ForConditionalGeneration

    from fasttune import FastVisionModel

    def init(model):  # (as tiny_vision.save_gemma4: images change the logits clearly)
        model.model.embed_vision.embedding_projection.weight.normal_(0, 0.3)

    folder = save_video_model(tmp_path_factory.mktemp("video4") / "m", Gemma4ForConditionalGeneration,
                              gemma4_config(video=True), _processor(), init=init)
    return (*FastVisionModel.from_pretrained(str(folder), dtype=torch.float32), folder)


def test_video_rows_train_and_equal_transformers(video_model, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    from fasttune import FastVisionModel
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc, folder = video_model
    assert proc.video_token == "<|video|>"  # (and Gemma4VideoProcessor's sampling defaults, not in the saved file)
    assert proc.video_settings == {"max_soft_tokens": 70, "do_sample_frames": True, "num_frames": 32}
    # patterned frames: a run of equal patches would hide which of them a token attends (the sliding window, 4
    # tokens, is shorter than a frame's run)
    red, blue = (Image.fromarray(f) for f in patterned_frames(2, 48, 64))
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": [red, blue, red], "fps": 1},
                                                       {"type": "text", "text": "what happens?"}]},
                          {"role": "assistant", "content": "it blinks"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "and"},
                                                       {"type": "video", "video": [blue, blue]}]},
                          {"role": "assistant", "content": "still"}]}]
    enc = VisionEncoder(proc, 512, train_on_responses_only=True, base_dir=tmp_path)
    examples = [enc.encode(r, i) for i, r in enumerate(rows)]
    assert "00:00 <|image><|video|>" in proc.tokenizer.decode(examples[0]["input_ids"])
    assert "<image|> 00:02 <|image>" in proc.tokenizer.decode(examples[0]["input_ids"])  # third frame, at 1 fps
    for ex, frames in zip(examples, (3, 2)):
        per_frame = ex["input_ids"].count(proc.video_token_id) // frames
        assert per_frame > 0 and ex["input_ids"].count(proc.video_token_id) == per_frame * frames
        assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t == proc.video_token_id)
    batch = collate_vision(examples, proc)
    assert batch["num_frames_per_video"].tolist() == [3, 2]
    hf = Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    check_video_batch(model, hf, proc, batch, [{"type": "video", "video": [red, blue]},
                                               {"type": "text", "text": "next?"}], pad_token_id=0)
    lora = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, use_gradient_checkpointing=False)
    lora(**batch).loss.backward()  # the frames' gradients reach the tower's adapters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters()
               if "vision_tower" in n and "lora_B" in n)
