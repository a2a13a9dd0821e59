"""LLaVA-OneVision's videos (tests/tiny_vision.py's save_llava_onevision_video: a 42-pixel SigLIP tower, so each
frame's 3 x 3 features pool to 2 x 2 by bilinear interpolation): the processor's token counts are
LlavaOnevisionProcessor's own formula (its class needs torchvision to be built, so its method is the oracle), its
pixels LlavaOnevisionVideoProcessor's steps, and features, logits, the training loss and generation equal
transformers' LlavaOnevisionForConditionalGeneration, with videos of one length (transformers' (videos, frames, C,
H, W) layout) and of different lengths (all frames with num_frames_per_video, against one transformers call a row)."""
import pytest
import torch
from tiny_vision import noise_image

from fasttune.errors import ConfigError

VIDEO = 260


@pytest.fixture(scope="module")
def loaded(onevision_video_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(onevision_video_dir), device="cpu")  # (beside transformers on the CPU)


@pytest.fixture(scope="module")
def hf(onevision_video_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(onevision_video_dir)).eval()


def _frames(n, seed, size=(42, 42)):
    return [noise_image(size, seed + i) for i in range(n)]


def _prompt(proc, *items):
    content = [{"type": kind} for kind in items] + [{"type": "text", "text": "what happens?"}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _oracle_count(frames):
    """LlavaOnevisionProcessor.replace_video_token's count for the tiny tower (3 x 3 patches a frame)."""
    from transformers import LlavaOnevisionProcessor

    class Oracle:
        video_token, num_image_tokens = "<video>", 9

    text = LlavaOnevisionProcessor.replace_video_token(Oracle(), {"pixel_values_videos": [[0] * frames]}, 0)
    return text.count("<video>")


def test_counts_and_pixels_are_the_processors(loaded):
    _, proc = loaded
    batch = proc(text=[_prompt(proc, "video"), _prompt(proc, "video")], videos=[_frames(3, 0), _frames(3, 10)])
    assert (batch["input_ids"] == VIDEO).sum(1).tolist() == [_oracle_count(3)] * 2 == [3 * 4 + 1] * 2
    assert tuple(batch["pixel_values_videos"].shape) == (2, 3, 3, 42, 42) and "num_frames_per_video" not in batch
    # LlavaOnevisionVideoProcessor: rescale by 1/255, normalise with OpenAI CLIP's mean and std (its defaults)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    import numpy as np

    raw = torch.from_numpy(np.asarray(_frames(1, 10)[0])).permute(2, 0, 1).float() / 255
    want = (raw - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    torch.testing.assert_close(batch["pixel_values_videos"][1, 0], want, rtol=0, atol=1e-6)
    # frames of another size are resized to the video size; lengths that differ give all frames with their counts
    mixed = proc(text=[_prompt(proc, "video"), _prompt(proc, "video")],
                 videos=[_frames(2, 20, (60, 50)), _frames(4, 30)])
    assert tuple(mixed["pixel_values_videos"].shape) == (6, 3, 42, 42)
    assert mixed["num_frames_per_video"].tolist() == [2, 4]
    assert (mixed["input_ids"] == VIDEO).sum(1).tolist() == [_oracle_count(2), _oracle_count(4)]


def test_features_and_logits_equal_transformers(loaded, hf):
    model, proc = loaded
    batch = proc(text=[_prompt(proc, "video"), _prompt(proc, "image", "video")],
                 videos=[_frames(3, 0), _frames(3, 10)], images=[noise_image((70, 30), 5)])
    with torch.no_grad():
        x = model.embed(batch["input_ids"], videos={"pixel_values_videos": batch["pixel_values_videos"]},
                        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_sizes"])
        want = hf.model.get_video_features(batch["pixel_values_videos"]).pooler_output.flatten(0, 1)
        ours, ref = model(**batch).logits, hf(**batch).logits
    torch.testing.assert_close(x[batch["input_ids"] == VIDEO], want, rtol=1e-5, atol=1e-6)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_videos_of_different_lengths_equal_one_transformers_call_a_row(loaded, hf):
    model, proc = loaded
    videos = [_frames(2, 40), _frames(4, 50)]
    texts = [_prompt(proc, "video"), _prompt(proc, "video")]
    batch = proc(text=texts, videos=videos)
    with torch.no_grad():
        ours = model(**batch).logits
        for row in range(2):
            one = proc(text=[texts[row]], videos=[videos[row]])
            ref = hf(**one).logits[0]
            torch.testing.assert_close(ours[row, :ref.shape[0]], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="num_frames_per_video \\[2, 3\\] adds up to 5 frames but "
                                          "pixel_values_videos holds 6"):
        model(**{**batch, "num_frames_per_video": torch.tensor([2, 3])})


def test_training_rows_and_generation(loaded, hf):
    """Collated training rows (a video file's worth of frames in a data row) give transformers' loss; greedy
    generation from a video prompt starts with the full forward's token."""
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = loaded
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": _frames(3, 60 + 10 * k)},
                                                       {"type": "text", "text": "describe"}]},
                          {"role": "assistant", "content": "noise, mostly"}]} for k in range(2)]
    encoder = VisionEncoder(proc, 512, train_on_responses_only=True)
    collated = collate_vision([encoder.encode(row, i) for i, row in enumerate(rows)], proc)
    assert tuple(collated["pixel_values_videos"].shape) == (2, 3, 3, 42, 42)
    assert (collated["labels"][collated["input_ids"] == VIDEO] == -100).all()
    with torch.no_grad():
        torch.testing.assert_close(model(**collated).loss, hf(**collated).loss, rtol=1e-5, atol=1e-6)
    prompt = proc.chat_inputs([[{"role": "user", "content": [{"type": "video", "video": _frames(3, 90)},
                                                             {"type": "text", "text": "?"}]}]])
    with torch.no_grad():
        last = model(**prompt).logits[:, -1].argmax(-1)
    out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, prompt["input_ids"].shape[1]], last)
