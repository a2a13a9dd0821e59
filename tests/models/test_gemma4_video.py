"""Gemma 4 with video frames (models/vision.py): each frame's padded patches and positions (pixel_values_videos,
video_position_ids) through the vision tower and embedder as images go, the features in place of the video tokens,
each frame's tokens seeing each other both ways in the sliding layers as an image's do; logits and greedy
generation equal transformers' (fp32, the 31B's layout and E2B's, whose per-layer embeddings look up the pad token
at the frames' positions). The processor's output is built from frames with the image processor, as the video
processor patchifies them (transformers' Gemma4VideoProcessor needs torchvision)."""
import pytest
import torch
from tiny_vision import save_gemma4, solid_image

from fasttune import FastVisionModel

E2B = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
           hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, num_kv_shared_layers=2)


def _video_batch(proc, video_token_id: int):
    """Row 1: text, a 3-frame video (a timestamp token pair before each frame's marks), text; row 2: text only,
    left-padded. Returns (inputs for our model, mm_token_type_ids for transformers')."""
    frames = [solid_image("red"), solid_image((0, 0, 255)), solid_image((0, 200, 0))]
    pix = proc.image_processor(images=frames, return_tensors="pt")
    boi, eoi = proc.tokenizer.convert_tokens_to_ids(list(proc.soft_token_marks))
    row = [5, 6, 7]
    for n in pix["num_soft_tokens_per_image"].tolist():
        row += [11, 12, boi] + [video_token_id] * int(n) + [eoi]
    row += [8, 9]
    other = [13, 14, 15, 16]
    ids = torch.tensor([row, [0] * (len(row) - len(other)) + other])
    mask = torch.tensor([[1] * len(row), [0] * (len(row) - len(other)) + [1] * len(other)])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pix["pixel_values"],
              "video_position_ids": pix["image_position_ids"], "num_frames_per_video": torch.tensor([3])}
    return inputs, {"mm_token_type_ids": (ids == video_token_id).long() * 2}


@pytest.mark.parametrize("layout", [{}, E2B], ids=["31b", "e2b"])
def test_video_logits_and_generation_equal_transformers(layout, tmp_path):
    from transformers import AutoModelForImageTextToText

    folder = save_gemma4(tmp_path / "m", video=True, **layout)
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, marks = _video_batch(proc, model.video_token_id)
    with torch.no_grad():
        ours, ref = model(**inputs).logits, hf(**inputs, **marks).logits
        causal = hf(**inputs).logits  # without the marks transformers treats the frames as text: one-way
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    assert (ours[real] - causal[real]).abs().max() > 1e-4  # the frames' two-way attention counts
    want = hf.generate(**inputs, **marks, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), want)


def test_video_tokens_without_frames_are_named(tmp_path):
    from fasttune.errors import ConfigError

    model, proc = FastVisionModel.from_pretrained(str(save_gemma4(tmp_path / "m", video=True)), dtype=torch.float32)
    inputs, _ = _video_batch(proc, model.video_token_id)
    with torch.no_grad(), pytest.raises(ConfigError, match="video placeholder tokens but no pixel_values_videos"):
        model(input_ids=inputs["input_ids"])
