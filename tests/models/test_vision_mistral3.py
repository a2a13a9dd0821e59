"""What is particular to Mistral 3 (Pixtral tower) among the vision-language families: images of any size in rows of
[IMG] tokens closed by [IMG_BREAK] / [IMG_END] (PixtralProcessor's expansion), which are never targets, image_sizes
with the pixels, and the refusals. Logits, LoRA, merging, 4-bit and generation run in the shared vision tests."""
import pytest
import torch
from tiny_vision import MISTRAL3_TOKENS, solid_image

from fasttune.errors import ConfigError


@pytest.fixture(scope="module")
def loaded(mistral3_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(mistral3_vl_dir))


def test_images_expand_to_rows_of_tokens_that_are_never_targets(loaded):
    """A 64 x 32 (w x h) image resized within 64 pixels: 2 rows of 4 [IMG] (one per 16 pixels), the first row closed
    by [IMG_BREAK], the last by [IMG_END]; none of them is a label."""
    from fasttune.data.vision_rows import VisionEncoder

    _, proc = loaded
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": solid_image("red", (64, 32))},
                                                     {"type": "text", "text": "colour?"}]},
                        {"role": "assistant", "content": "red"}]}
    ex = VisionEncoder(proc, 256, train_on_responses_only=False).encode(row, 0)
    brk, end, img = proc.tokenizer.convert_tokens_to_ids(MISTRAL3_TOKENS)
    start = ex["input_ids"].index(img)
    assert ex["input_ids"][start:start + 10] == [img] * 4 + [brk] + [img] * 4 + [end]
    marks = {brk, end, img}
    assert all(lab == -100 for t, lab in zip(ex["input_ids"], ex["labels"]) if t in marks)
    assert any(lab != -100 for lab in ex["labels"])
    batch = proc(text=[proc.apply_chat_template(row["messages"])], images=[solid_image("red", (64, 32))])
    assert batch["image_sizes"].tolist() == [[32, 64]] and batch["input_ids"][0].tolist() == ex["input_ids"]


def test_pixels_without_image_sizes_are_refused(loaded):
    model, proc = loaded
    batch = proc(text=[proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])],
                 images=[solid_image("red")])
    with torch.no_grad(), pytest.raises(ConfigError, match="image_sizes"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


def test_gguf_export_refuses_features_llama_cpp_does_not_take(loaded, tmp_path):
    """llama.cpp's pixtral projects the tower's last layer; another vision_feature_layer is refused before writing
    (the export itself runs in llama.cpp in tests/export/test_gguf_mmproj.py)."""
    model, proc = loaded
    model.hf_config.vision_feature_layer = -2
    try:
        with pytest.raises(ConfigError, match="vision layer -2 .vision_feature_layer"):
            model.save_pretrained_gguf(tmp_path / "out", proc, quantization_method="f16", progress=False)
    finally:
        model.hf_config.vision_feature_layer = -1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text_type", ["mistral", "mistral4"])
def test_mistral_small_layout_equals_transformers(text_type, tmp_path):
    """Mistral Small 3.1 / 3.2 and Magistral Small: the same tower before a plain Mistral text model (no query
    scaling); Mistral Small 4: before a Mistral 4 one (latent attention, experts, query scaling from position 16):
    logits equal transformers' on an image batch of 25 tokens."""
    from tiny_vision import save_mistral3
    from transformers import AutoModelForImageTextToText

    from fasttune import FastVisionModel

    folder = save_mistral3(tmp_path / "small", text_type=text_type)
    model, proc = FastVisionModel.from_pretrained(str(folder))
    assert model.arch.model_type == text_type and (model.arch.query_position_scale is None) == (text_type == "mistral")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}])
    batch = proc(text=[text], images=[solid_image("red", (48, 64))])
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, rtol=1e-5, atol=1e-5)


def test_mistral_small_4_switches_adapt_the_latent_attention_and_the_experts(tmp_path):
    """FastVisionModel.get_peft_model's layer switches on Mistral Small 4: the latent attention's projections (it has
    no q/k/v_proj), the dense layer's MLP and the shared experts (as PEFT reads the MLP names there) and the routed
    experts as target_parameters."""
    from tiny_vision import save_mistral3

    from fasttune import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(str(save_mistral3(tmp_path / "small4", text_type="mistral4")))
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False)
    adapted = {n.split(".lora_")[0].split(".", 3)[-1] for n, _ in model.named_parameters() if ".lora_" in n}
    want = {f"self_attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    want |= {f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    want |= {f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    want |= {"mlp.experts.lora.down_proj", "mlp.experts.lora.gate_up_proj"}
    assert adapted == want
    assert model.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
