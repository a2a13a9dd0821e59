"""What is particular to LLaVA-OneVision beside LLaVA-NeXT (tests/models/test_vision_llava_next.py): a SigLIP tower
whose every patch is a feature (the "full" strategy), and a grid holding more than anyres_max_N tiles' features
interpolated down (bilinear), so the <image> counts are LlavaOnevisionProcessor's (its own count, the oracle here:
the processor itself needs torchvision for its video part); features and logits against transformers on noise
images whose grids are and are not shrunk. Logits, LoRA, merging, 4-bit and generation run in the shared vision tests
(tests/conftest.py's vl_dir)."""
import pytest
import torch
from tiny_vision import noise_image

from fasttune.data.vision_layouts import anyres_token_count

SIZES = [(70, 30), (30, 70), (40, 40), (100, 20), (28, 28)]  # (width, height); the last: one tile, nothing shrunk


@pytest.fixture(scope="module")
def loaded(llava_onevision_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(llava_onevision_vl_dir))


def _oracle_count(proc, height, width):
    """LlavaOnevisionProcessor's own count ("full" strategy: nothing subtracted) for the tiny processor's settings."""
    from transformers import LlavaOnevisionProcessor

    class Oracle:
        image_processor = proc.image_processor
        num_image_tokens = 4
        vision_aspect_ratio = "anyres_max_1"
        _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features
        _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features

    return Oracle()._get_number_of_features(height, width, 28, 28)


def test_token_counts_equal_the_onevision_processors(loaded):
    _, proc = loaded
    counts = [anyres_token_count(h, w, *proc.anyres) for w, h in SIZES]
    assert counts == [_oracle_count(proc, h, w) for w, h in SIZES]
    uncapped = [anyres_token_count(h, w, *proc.anyres[:3]) for w, h in SIZES]
    assert [c < u for c, u in zip(counts, uncapped)] == [True, True, True, True, False]


def test_features_and_logits_equal_transformers(loaded, llava_onevision_vl_dir):
    from transformers import AutoModelForImageTextToText

    model, proc = loaded
    images = [noise_image(size, 30 + i) for i, size in enumerate(SIZES)]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                                      add_generation_prompt=True) for _ in images]
    batch = proc(text=texts, images=images)
    assert (batch["input_ids"] == proc.image_token_id).sum(1).tolist() == [
        anyres_token_count(h, w, *proc.anyres) for w, h in SIZES]
    hf = AutoModelForImageTextToText.from_pretrained(str(llava_onevision_vl_dir)).eval()
    with torch.no_grad():
        feats = model.image_features(batch["pixel_values"], batch["image_sizes"])[0]
        want = torch.cat(hf.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output)
        ours, ref = model(**batch).logits, hf(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def _oracle_tokens(proc, batch, index):
    """LlavaOnevisionProcessor.replace_image_token's count for image `index` of a processed batch."""
    from transformers import LlavaOnevisionProcessor

    class Oracle:
        image_processor = proc.image_processor
        num_image_tokens = 4
        vision_aspect_ratio = "anyres_max_1"
        vision_feature_select_strategy = "full"
        image_token = "<image>"
        _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features
        _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features
        replace_image_token = LlavaOnevisionProcessor.replace_image_token

    return Oracle().replace_image_token(batch, index).count("<image>")


def test_rows_of_several_images_take_their_whole_image_tile_only(loaded, llava_onevision_vl_dir):
    """A row holding several images: its images are not tiled (LlavaOnevisionImageProcessor's batch_num_images), each
    one tile's features and a newline, as transformers' processor counts them and its model computes them; generation
    prompts (chat_inputs) and collated training rows carry batch_num_images."""
    from transformers import AutoModelForImageTextToText

    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = loaded
    two = [{"type": "image", "image": noise_image(SIZES[0], 40)}, {"type": "image", "image": noise_image(SIZES[1], 41)},
           {"type": "text", "text": "which is wider?"}]
    one = [{"type": "image", "image": noise_image(SIZES[2], 42)}, {"type": "text", "text": "?"}]
    batch = proc.chat_inputs([[{"role": "user", "content": two}], [{"role": "user", "content": one}]])
    assert batch["batch_num_images"].tolist() == [2, 1] and batch["pixel_values"].shape[:2] == (3, 5)
    counts = [(row == proc.image_token_id).sum().item() for row in batch["input_ids"]]
    assert counts == [_oracle_tokens(proc, batch, 0) + _oracle_tokens(proc, batch, 1), _oracle_tokens(proc, batch, 2)]
    assert counts[0] == 2 * (4 + 1)
    hf = AutoModelForImageTextToText.from_pretrained(str(llava_onevision_vl_dir)).eval()
    with torch.no_grad():
        ours, ref = model(**batch).logits, hf(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    # greedy generation from those prompts: its first token is the full forward's
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, batch["input_ids"].shape[1]], ours[:, -1].argmax(-1))
    rows = [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "the first"}]}
            for content in (two, one)]
    encoder = VisionEncoder(proc, 512, train_on_responses_only=True)
    collated = collate_vision([encoder.encode(row, i) for i, row in enumerate(rows)], proc)
    assert collated["batch_num_images"].tolist() == [2, 1]
    with torch.no_grad():
        torch.testing.assert_close(model(**collated).loss, hf(**collated).loss, rtol=1e-5, atol=1e-6)


def test_prompt_media_of_grpo_and_dpo_rows_carries_images_per_row(loaded):
    """GRPO's / DPO's prompt media (vision_prompts.prompt_media): a group's copies of a two-image prompt and a
    one-image prompt keep their rows' image counts, so the scoring forward tiles as sampling did."""
    from fasttune.data.vision_prompts import prompt_media

    _, proc = loaded
    two = {"images": [noise_image(SIZES[0], 50), noise_image(SIZES[1], 51)]}
    one = {"images": [noise_image(SIZES[2], 52)]}
    media = prompt_media([two, two, one], proc)
    assert media["batch_num_images"].tolist() == [2, 2, 1] and media["pixel_values"].shape[0] == 5
