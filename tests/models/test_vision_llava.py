"""What is particular to LLaVA among the vision-language families: a fixed number of <image> tokens an image (one per
patch, the class token dropped by the "default" select strategy), as transformers' LlavaProcessor writes them, none of
them targets, and LLaVA checkpoints with another tower than CLIP / SigLIP refused by name. Logits, LoRA, merging,
4-bit, generation and the SFT loss curve run in the shared vision tests (tests/conftest.py's vl_dir)."""
import pytest
import torch
from tiny_vision import solid_image

from fasttune.errors import ModelLoadError


@pytest.fixture(scope="module")
def loaded(llava_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(llava_vl_dir))


def test_tokens_and_pixels_equal_transformers_processor(loaded):
    from transformers import LlavaProcessor

    _, proc = loaded
    theirs = LlavaProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer, patch_size=14,
                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                            chat_template=proc.chat_template)
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                                      add_generation_prompt=True) for t in ("colour?", "and this one, twice?")]
    images = [solid_image("red", (40, 30)), solid_image((0, 0, 255), (28, 60))]
    got = proc(text=texts, images=images)
    want = theirs(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])
    assert int((got["input_ids"] == proc.image_token_id).sum()) == 2 * 4


def test_image_tokens_are_never_targets(loaded):
    from fasttune.data.vision_rows import VisionEncoder

    _, proc = loaded
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": solid_image("red")},
                                                     {"type": "text", "text": "colour?"}]},
                        {"role": "assistant", "content": "red"}]}
    ex = VisionEncoder(proc, 256, train_on_responses_only=False).encode(row, 0)
    assert ex["input_ids"].count(proc.image_token_id) == 4
    assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t == proc.image_token_id)
    assert any(lab != -100 for lab in ex["labels"])


def test_a_pixtral_tower_is_refused_by_name(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from fasttune import FastVisionModel

    text = dict(model_type="mistral", vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=16, patch_size=8, image_size=64)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=259)) \
        .save_pretrained(tmp_path / "pixtral-llava")
    with pytest.raises(ModelLoadError, match="LLaVA model with a pixtral vision tower; fasttune runs LLaVA with CLIP"):
        FastVisionModel.from_pretrained(str(tmp_path / "pixtral-llava"))
