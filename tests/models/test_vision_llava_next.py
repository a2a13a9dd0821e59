"""What is particular to LLaVA-NeXT among the vision-language families: each image as its whole-image tile plus a grid
of tiles (the pinpoint transformers' select_best_resolution picks), the grid's features cut back to the image's aspect
ratio with a newline feature a row, so an image's <image> count depends on its size (LlavaNextProcessor's, the
oracle here); the features' order within and across tiles against transformers on noise images (the shared vision
tests use solid colours, whose tiles are alike); configs fasttune does not run refused by name. Logits, LoRA, merging,
4-bit, generation and training run in the shared vision tests (tests/conftest.py's vl_dir)."""
import pytest
import torch
from tiny_vision import noise_image

from fasttune.data.vision_layouts import anyres_token_count
from fasttune.errors import ModelLoadError

SIZES = [(70, 30), (30, 70), (40, 40), (100, 20), (29, 57)]  # (width, height): grids 1x2 / 2x1 / 2x2 / 1x3 / 2x1


@pytest.fixture(scope="module")
def loaded(llava_next_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(llava_next_vl_dir))


def _texts(proc, n):
    return [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                                     add_generation_prompt=True) for _ in range(n)]


def test_tokens_and_pixels_equal_transformers_processor(loaded):
    from transformers import LlavaNextProcessor

    _, proc = loaded
    theirs = LlavaNextProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer, patch_size=14,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=proc.chat_template)
    images = [noise_image(size, i) for i, size in enumerate(SIZES)]
    got = proc(text=_texts(proc, len(images)), images=images)
    want = theirs(text=_texts(proc, len(images)), images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["pixel_values"], want["pixel_values"]) and torch.equal(got["image_sizes"],
                                                                                   want["image_sizes"])
    counts = (got["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert counts == [anyres_token_count(h, w, *proc.anyres) for w, h in SIZES]
    assert len(set(counts)) > 2  # the sizes give different counts: the unpadding is exercised


def test_logits_equal_transformers_on_noise_images_of_several_grids(loaded, llava_next_vl_dir):
    from transformers import AutoModelForImageTextToText

    model, proc = loaded
    images = [noise_image(size, 10 + i) for i, size in enumerate(SIZES)]
    batch = proc(text=_texts(proc, len(images)), images=images)
    hf = AutoModelForImageTextToText.from_pretrained(str(llava_next_vl_dir)).eval()
    with torch.no_grad():
        ours, ref = model(**batch).logits, hf(**batch).logits
        feats = model.image_features(batch["pixel_values"], batch["image_sizes"])[0]
        want = torch.cat(hf.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_a_strategy_that_does_not_fit_the_tower_is_refused(llava_next_vl_dir, tmp_path):
    import shutil

    from fasttune import FastVisionModel

    folder = tmp_path / "full"
    shutil.copytree(llava_next_vl_dir, folder)
    config = (folder / "config.json").read_text().replace('"vision_feature_select_strategy": "default"',
                                                          '"vision_feature_select_strategy": "full"')
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="'full' strategy from a clip_vision_model tower"):
        FastVisionModel.from_pretrained(str(folder))


def test_collated_rows_of_different_sizes_give_transformers_loss(loaded, llava_next_vl_dir):
    """Training rows with images of different sizes collate into one batch (tiles padded per image, image_sizes) whose
    loss and image-token labels match transformers' model on the same batch."""
    from transformers import AutoModelForImageTextToText

    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = loaded
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": noise_image(size, 20 + i)},
                                                       {"type": "text", "text": "what is it?"}]},
                          {"role": "assistant", "content": "noise" * (i + 1)}]} for i, size in enumerate(SIZES[:3])]
    encoder = VisionEncoder(proc, 512, train_on_responses_only=True)
    batch = collate_vision([encoder.encode(row, i) for i, row in enumerate(rows)], proc)
    assert batch["pixel_values"].shape[:2] == (3, 5) and batch["image_sizes"].tolist() == [[h, w] for w, h in
                                                                                          SIZES[:3]]
    assert (batch["labels"][batch["input_ids"] == proc.image_token_id] == -100).all()
    hf = AutoModelForImageTextToText.from_pretrained(str(llava_next_vl_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, hf(**batch).loss, rtol=1e-5, atol=1e-6)


def test_gguf_export_is_refused_before_writing(loaded, tmp_path):
    """llama.cpp's clip has no LLaVA-NeXT tiling in fasttune's mmproj writer: refused by name, nothing written."""
    from fasttune.errors import ConfigError

    model, proc = loaded
    with pytest.raises(ConfigError, match="GGUF export of llava_next vision-language models is not supported"):
        model.save_pretrained_gguf(tmp_path / "out", proc)
    assert not (tmp_path / "out").exists()
