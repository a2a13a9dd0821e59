"""What is particular to Aya Vision among the vision-language families: GotOcr2's crops and thumbnail, each tile's
patch tokens after a TILE_<k> (the thumbnail's after TILE_GLOBAL) between <|START_OF_IMG|> and <|END_OF_IMG|>, as
AyaVisionProcessor writes them (the oracle here), the projector's own pixel shuffle, and the Cohere 2 text model.
Logits, LoRA, merging, 4-bit, generation and training run in the shared vision tests (tests/conftest.py's vl_dir)."""
import pytest
import torch
from tiny_vision import noise_image

SIZES = [(40, 120), (56, 56), (120, 30), (100, 100)]  # (width, height): several crop grids and a thumbnail alone


@pytest.fixture(scope="module")
def loaded(aya_vision_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(aya_vision_vl_dir), device="cpu")


def _texts(proc, n):
    return [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                                     add_generation_prompt=True) for _ in range(n)]


def test_tokens_pixels_and_logits_equal_transformers(loaded, aya_vision_vl_dir):
    from transformers import AyaVisionForConditionalGeneration, AyaVisionProcessor

    model, proc = loaded
    theirs = AyaVisionProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer, patch_size=14,
                                img_size=56, downsample_factor=2, chat_template=proc.chat_template)
    images = [noise_image(size, i) for i, size in enumerate(SIZES)]
    got = proc(text=_texts(proc, len(images)), images=images)
    want = theirs(text=_texts(proc, len(images)), images=images, padding=True, padding_side="right",
                  return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])
    counts = (got["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert len(set(counts)) > 1 and min(counts) == 4  # a thumbnail alone, and crop grids
    hf = AyaVisionForConditionalGeneration.from_pretrained(str(aya_vision_vl_dir)).eval()
    real = got["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**got).logits[real], hf(**want).logits[real], rtol=1e-5, atol=1e-5)
