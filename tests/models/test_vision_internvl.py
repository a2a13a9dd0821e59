"""What is particular to InternVL among the vision-language families: each image as patches (GotOcr2's crops plus a
thumbnail) written as <img>, the context token per patch token, </img> (transformers' InternVLProcessor's expansion,
whose processor needs torchvision for its video part, so its replace_image_token is the oracle here), none of them
targets (a tokenizer without the marks: tests/data/test_vision_settings.py). Logits, LoRA, merging, 4-bit,
generation and the SFT loss curve run in the shared vision tests (tests/conftest.py's vl_dir)."""
from types import SimpleNamespace

import pytest
import torch
from tiny_vision import INTERNVL_TOKENS, solid_image

IMAGES = [((200, 30, 30), (120, 60)), ((30, 40, 210), (40, 40)), ((0, 200, 0), (56, 130))]  # 2, 1 and 2 crops


@pytest.fixture(scope="module")
def loaded(internvl_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(internvl_vl_dir))


def _texts(proc):
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    two = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}]}]
    return [proc.apply_chat_template(m, add_generation_prompt=True) for m in (one, two)]


def test_tokens_and_patches_equal_transformers_expansion(loaded):
    """Each image's text is transformers' InternVLProcessor.replace_image_token for its patch count (4 tokens a
    patch), and pixel_values are the image processor's patches of the images in order."""
    from transformers import InternVLProcessor

    _, proc = loaded
    images = [solid_image(colour, size) for colour, size in IMAGES]
    got = proc(text=_texts(proc), images=images)
    pix = proc.image_processor(images=images, return_tensors="pt")
    counts = pix["num_patches"].tolist()
    assert counts == [3, 1, 3] and torch.equal(got["pixel_values"], pix["pixel_values"])
    oracle = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                             image_seq_length=4)
    spans = [InternVLProcessor.replace_image_token(oracle, {"num_patches": counts}, i) for i in range(3)]
    texts = _texts(proc)
    texts = [texts[0].replace("<IMG_CONTEXT>", spans[0]),
             texts[1].replace("<IMG_CONTEXT>", "\0", 1).replace("<IMG_CONTEXT>", spans[2]).replace("\0", spans[1])]
    for row, text in enumerate(texts):
        want = proc.tokenizer(text)["input_ids"]
        assert got["input_ids"][row, :len(want)].tolist() == want


def test_images_are_cropped_even_when_the_image_processor_says_not(loaded):
    """Released InternVL checkpoints save crop_to_patches=false in preprocessor_config.json; InternVLProcessor passes
    crop_to_patches=True over it (its images_kwargs), so images are still cut into patches, and so are ours."""
    from transformers import InternVLProcessor

    _, proc = loaded
    assert InternVLProcessor.images_kwargs["crop_to_patches"] is True
    images = [solid_image(colour, size) for colour, size in IMAGES]
    saved = proc.image_processor.crop_to_patches
    proc.image_processor.crop_to_patches = False
    try:
        got = proc(text=_texts(proc), images=images)
        assert proc.image_processor(images=images, return_tensors="pt")["pixel_values"].shape[0] == 3  # uncut
    finally:
        proc.image_processor.crop_to_patches = saved
    assert got["pixel_values"].shape[0] == 3 + 1 + 3
    assert sum(t == proc.image_token_id for t in got["input_ids"].flatten().tolist()) == (3 + 1 + 3) * 4


def test_marks_and_context_tokens_are_never_targets(loaded):
    from fasttune.data.vision_rows import VisionEncoder

    _, proc = loaded
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": solid_image("red", (120, 60))},
                                                     {"type": "text", "text": "colour?"}]},
                        {"role": "assistant", "content": "red"}]}
    ex = VisionEncoder(proc, 512, train_on_responses_only=False).encode(row, 0)
    marks = set(proc.tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS))
    assert sum(t in marks for t in ex["input_ids"]) == 2 + 3 * 4  # <img>, </img>, 3 patches of 4 tokens
    assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t in marks)
    assert any(lab != -100 for lab in ex["labels"])
