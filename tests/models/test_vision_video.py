"""Videos on the Qwen vision-language families (models/vision.py): logits equal transformers' with
pixel_values_videos / video_grid_thw (Qwen2-VL's plain frame positions, Qwen2.5-VL's frame index x tokens_per_second x
second_per_grid_ts, Qwen3-VL's and Qwen3.5's one grid per frame with timestamps between, and Qwen3-VL's DeepStack over
an image and a video in one row), greedy generation from a video prompt equals full forwards, and the refusals."""
import pytest
import torch

from fasttune.errors import ConfigError

VIDEO_FAMILIES = {"qwen2_vl": "qwen2_vl_dir", "qwen2_5_vl": "qwen_vl_dir", "qwen3_vl": "qwen3_vl_dir",
                  "qwen3_5": "qwen3_5_vl_dir"}


@pytest.fixture(params=sorted(VIDEO_FAMILIES))
def video_dir(request):
    return request.getfixturevalue(VIDEO_FAMILIES[request.param])


def _video(cfg, grid, frames_apart: bool) -> list[int]:
    """Placeholder ids of one video of grid (t, h, w): one run, or (Qwen3-VL, Qwen3.5) one run per frame between
    vision start/end tokens with two timestamp tokens before each, as their processors lay them out."""
    t, h, w = grid
    per_frame = (h // 2) * (w // 2)
    if not frames_apart:
        return [cfg.vision_start_token_id] + [cfg.video_token_id] * t * per_frame + [cfg.vision_end_token_id]
    out = []
    for f in range(t):
        out += [30 + f, 40] + [cfg.vision_start_token_id] + [cfg.video_token_id] * per_frame + [cfg.vision_end_token_id]
    return out


def _batch(model, with_image: bool) -> dict:
    """Two right-padded rows: [image,] video (2, 4, 4) and a video (2, 4, 8), with random patches."""
    cfg, family = model.hf_config, model.family
    frames_apart = family.video == "frames"
    g = torch.Generator().manual_seed(0)
    patch = cfg.vision_config.patch_size
    dim = cfg.vision_config.in_channels * cfg.vision_config.temporal_patch_size * patch * patch
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id] if with_image else []
    rows = [[10, 11] + image + [12] + _video(cfg, (2, 4, 4), frames_apart) + [13, 14, 15],
            [20] + _video(cfg, (2, 4, 8), frames_apart) + [21, 22]]
    width = max(map(len, rows))
    batch = {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
             "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
             "pixel_values_videos": torch.randn(2 * 4 * 4 + 2 * 4 * 8, dim, generator=g),
             "video_grid_thw": torch.tensor([[2, 4, 4], [2, 4, 8]])}
    if with_image:
        batch.update(pixel_values=torch.randn(16, dim, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]))
    if family.video == "scaled":
        batch["second_per_grid_ts"] = torch.tensor([0.5, 2.0])
    return batch


def _marks(batch, cfg):
    """transformers' mm_token_type_ids: 1 image, 2 video tokens."""
    ids = batch["input_ids"]
    return ((ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int())


def test_logits_equal_transformers_with_videos(video_dir):
    from transformers import AutoModelForImageTextToText

    from fasttune import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(str(video_dir))
    batch = _batch(model, with_image=model.family.model_type == "qwen3_vl")
    hf = AutoModelForImageTextToText.from_pretrained(video_dir).eval()
    with torch.no_grad():
        ours = model(**batch).logits
        ref = hf(**batch, mm_token_type_ids=_marks(batch, model.hf_config)).logits
        text_only = hf(input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == model.hf_config.video_token_id,
                                                                 5), attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    assert (ours[real] - text_only[real]).abs().max() > 1e-3  # the video's features and positions matter


def test_generate_from_a_video_equals_full_forwards(qwen_vl_dir):
    """Greedy KV-cache generation from a video prompt continues past the video's scaled positions (rope deltas)."""
    from fasttune import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(str(qwen_vl_dir))
    model.eval()
    batch = _batch(model, with_image=False)
    keep = batch["input_ids"][1:, :batch["attention_mask"][1].sum()]  # the unpadded second row
    videos = {"pixel_values_videos": batch["pixel_values_videos"][32:], "video_grid_thw": batch["video_grid_thw"][1:],
              "second_per_grid_ts": batch["second_per_grid_ts"][1:]}
    out = model.generate(input_ids=keep, **videos, max_new_tokens=4, do_sample=False)
    ids = keep
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=ids, **videos).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_refusals(qwen3_vl_dir, gemma3_vl_dir):
    from fasttune import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(str(qwen3_vl_dir))
    batch = _batch(model, with_image=False)
    with pytest.raises(ConfigError, match="video placeholder tokens but no pixel_values_videos"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ConfigError, match="24 video placeholder tokens but its videos give 8 features: a row was "
                                          "cut inside a video"):  # one video's patches for the tokens of two
        model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"][:32],
                 "video_grid_thw": batch["video_grid_thw"][:1]})
    gemma, _ = FastVisionModel.from_pretrained(str(gemma3_vl_dir))
    with pytest.raises(ConfigError, match="takes no videos"):
        gemma(input_ids=torch.tensor([[5, 6]]), pixel_values_videos=torch.zeros(4, 8),
              video_grid_thw=torch.tensor([[1, 2, 2]]))


def test_transformers_trainer_trains_on_video_batches(qwen_vl_dir, tmp_path):
    """transformers' Trainer with a collator of the user's own: the video keys reach our forward whole (dropped, the
    placeholders would be refused), and LoRA learns."""
    from transformers import Trainer, TrainingArguments

    from fasttune import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(str(qwen_vl_dir))
    model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    batch = _batch(model, with_image=False)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    labels = labels.masked_fill(labels == model.hf_config.video_token_id, -100)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-3,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=[{"row": 0}, {"row": 1}],
                      data_collator=lambda rows: {**batch, "labels": labels})
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
