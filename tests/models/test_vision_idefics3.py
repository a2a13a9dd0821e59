"""What is particular to Idefics3 / SmolVLM among the vision-language families: each image as tiles (a grid of crops
plus the whole image) whose tokens VisionProcessor writes as transformers' Idefics3Processor does, the tiles'
pixel_attention_mask, transformers' own (rows, images, C, H, W) layout at the model, the layout's marks never being
targets, and the refusals. Logits, LoRA, merging, 4-bit, generation and the SFT loss curve run in the shared vision
tests (tests/conftest.py's vl_dir)."""
import pytest
import torch
from tiny_vision import IDEFICS3_TOKENS, idefics3_processor, solid_image

from fasttune.errors import ConfigError

SIZES = [(40, 30), (56, 56), (120, 90), (30, 100)]  # (width, height): one tile only, 1 x 1, 2 x 2 and 2 x 1 crops


@pytest.fixture(scope="module")
def loaded(idefics3_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(idefics3_vl_dir))


def _two_rows(proc):
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    two = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}]}]
    return [proc.apply_chat_template(m, add_generation_prompt=True) for m in (one, two)]


@pytest.mark.parametrize("sizes", [SIZES[:3], SIZES[1:]])
def test_tokens_and_tiles_equal_transformers_processor(sizes):
    """Our processor's input_ids equal transformers' Idefics3Processor's (crop marks, the global image, 4 tokens a
    tile) and its tiles are transformers' pixel_values / pixel_attention_mask without the padding images."""
    from transformers import Idefics3Processor

    ours = idefics3_processor()
    theirs = Idefics3Processor(image_processor=ours.image_processor, tokenizer=ours.tokenizer, image_seq_len=4,
                               chat_template=ours.chat_template)
    texts = _two_rows(ours)
    images = [solid_image((200, 30, 30), sizes[0]), solid_image((30, 40, 210), sizes[1]),
              solid_image((30, 180, 40), sizes[2])]
    got = ours(text=texts, images=images)
    want = theirs(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                            want["attention_mask"])
    real = want["pixel_values"].flatten(0, 1).flatten(1).ne(0).any(-1)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"].flatten(0, 1)[real])
    assert torch.equal(got["pixel_attention_mask"].bool(), want["pixel_attention_mask"].flatten(0, 1)[real].bool())
    assert got["pixel_values"].shape[0] == int(real.sum()) > 3  # more tiles than images


def test_layout_marks_are_never_targets(loaded):
    """The fake, global and <row_r_col_c> tokens around an image's tiles, and the tiles' tokens, are never labels."""
    from fasttune.data.vision_rows import VisionEncoder

    _, proc = loaded
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": solid_image("red", (120, 90))},
                                                     {"type": "text", "text": "colour?"}]},
                        {"role": "assistant", "content": "red"}]}
    ex = VisionEncoder(proc, 512, train_on_responses_only=False).encode(row, 0)
    marks = set(proc.tokenizer.convert_tokens_to_ids(IDEFICS3_TOKENS)) - {proc.tokenizer.convert_tokens_to_ids(
        "<end_of_utterance>")}
    assert sum(t in marks for t in ex["input_ids"]) == 2 * 2 * (1 + 1 + 4) + 2 + 1 + 4  # 4 crops + the whole image
    assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t in marks)
    assert any(lab != -100 for lab in ex["labels"])


def test_transformers_layout_and_masks_reach_the_tower(loaded):
    """transformers' (rows, images, C, H, W) pixel_values (padding images all zeros) give the logits of the flat
    tiles; a tile's masked-out pixels change nothing where its mask is 0 over whole patches, and the mask counts."""
    model, proc = loaded
    texts = _two_rows(proc)
    images = [solid_image("red", (40, 30)), solid_image((0, 0, 255), (56, 56)), solid_image((0, 200, 0), (30, 100))]
    batch = proc(text=texts, images=images)
    with torch.no_grad():
        flat = model(**batch).logits
        padded = torch.cat([batch["pixel_values"], torch.zeros_like(batch["pixel_values"][:2])])[None]
        mask = torch.cat([batch["pixel_attention_mask"], torch.zeros_like(batch["pixel_attention_mask"][:2])])[None]
        nested = model(**{**batch, "pixel_values": padded, "pixel_attention_mask": mask}).logits
        torch.testing.assert_close(nested, flat)
        half = batch["pixel_attention_mask"].clone()
        half[:, :, 28:] = 0  # the right half of every tile is padding
        masked = model(**{**batch, "pixel_attention_mask": half}).logits
    real = batch["attention_mask"].bool()
    assert (masked[real] - flat[real]).abs().max() > 1e-4


def test_tiles_that_do_not_fit_the_tokens_are_refused(loaded):
    model, proc = loaded
    batch = proc(text=_two_rows(proc)[:1], images=[solid_image("red", (40, 30))])
    with torch.no_grad(), pytest.raises(ConfigError, match="image placeholder tokens but its images give"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2),
              pixel_attention_mask=torch.cat([batch["pixel_attention_mask"]] * 2))
    with torch.no_grad(), pytest.raises(ConfigError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])
