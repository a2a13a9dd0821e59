"""processor_settings (data/vision_settings.py): the placeholder settings each vision-language family's config gives
VisionProcessor, video tokens only when the tokenizer holds them, Qwen3-VL's timestamp marks, Gemma 4's marks."""
import pytest
from tiny_vision import (GEMMA4_AUDIO_TOKENS, GEMMA4_TOKENS, VISION_TOKENS, gemma3_config, gemma4_config,
                         idefics3_config, internvl_config, mistral3_config, qwen3_vl_config, qwen_vl_config)
from tiny_tokenizer import make_tiny_tokenizer

from fasttune.data.vision_settings import processor_settings


def _tokenizer(tokens):
    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tokens})
    return tok


def test_qwen_families_read_videos_when_the_tokenizer_has_the_token():
    with_video = _tokenizer(VISION_TOKENS + ["<|video_pad|>"])  # ids 259-262
    config = qwen_vl_config()
    assert processor_settings(config, with_video) == dict(image_token="<|image_pad|>", merge_size=2)  # 271: none
    config.video_token_id = 262
    assert processor_settings(config, with_video)["video_token"] == "<|video_pad|>"
    assert "video_stamps" not in processor_settings(config, with_video)  # Qwen2.5-VL: one run, no timestamps
    config = qwen3_vl_config()
    config.video_token_id = 262
    settings = processor_settings(config, with_video)
    assert settings["video_stamps"] == ("<|vision_start|>", "<|vision_end|>")  # Qwen3-VL: timestamped frame runs


def test_gemma4_marks_and_video():
    tok = _tokenizer(GEMMA4_TOKENS + GEMMA4_AUDIO_TOKENS + ["<|video|>"])  # ids 259-265
    settings = processor_settings(gemma4_config(video=True), tok)
    assert settings == dict(image_token="<|image|>", merge_size=None, soft_token_marks=("<|image>", "<image|>"),
                            video_token="<|video|>")
    assert "video_token" not in processor_settings(gemma4_config(video=False), tok)  # (its id is outside the vocab)


def test_token_ids_outside_the_tokenizer_are_named():
    """A config whose token ids the tokenizer does not hold (another checkpoint's tokenizer) is a ModelLoadError
    naming the field."""
    from fasttune.errors import ModelLoadError

    tok = make_tiny_tokenizer()  # 259 tokens: none of the configs' vision ids
    for config, field in ((gemma3_config(), "boi_token_id"), (gemma4_config(video=False), "boi_token_id"),
                          (mistral3_config(), "image_token_id")):
        with pytest.raises(ModelLoadError, match=f"The config's {field} .* is not a token of this tokenizer"):
            processor_settings(config, tok)


@pytest.mark.parametrize("config,mark", [(mistral3_config, r"\[IMG_BREAK\]"),
                                         (idefics3_config, "<fake_token_around_image>"), (internvl_config, "<img>")],
                         ids=["mistral3", "idefics3", "internvl"])
def test_a_tokenizer_without_the_image_marks_is_named(config, mark):
    """Pixtral's row marks, Idefics3's tile marks, InternVL's <img>: a tokenizer that holds the image id but not the
    marks is a ModelLoadError naming the mark; one without the image id names image_token_id first."""
    from fasttune.errors import ModelLoadError

    tok = _tokenizer([f"<x{i}>" for i in range(8)])  # the configs' image ids (259-261) are tokens, the marks not
    with pytest.raises(ModelLoadError, match=mark):
        processor_settings(config(), tok)
    with pytest.raises(ModelLoadError, match="image_token_id .* is not a token of this tokenizer"):
        processor_settings(config(), make_tiny_tokenizer())
