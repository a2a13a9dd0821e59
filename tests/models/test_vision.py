"""Vision-language models on our decoder (models/vision.py): logits equal transformers' Qwen2.5-VL, Qwen3-VL
(DeepStack, interleaved multimodal RoPE) and Gemma 3 on image + text batches (fp32, tiny random models, images
of different sizes, padding, Gemma 3's two-way attention inside each image), Qwen's multimodal RoPE positions
equal get_rope_index, LoRA adapters load in PEFT with equal loss and gradients, and merged checkpoints (16-bit, and
NF4 with a 16-bit tower) load in transformers."""
import pytest
import torch
from tiny_vision import oracle_inputs as _oracle_inputs, solid_image

from fasttune.errors import ConfigError

CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


def _batch(proc):
    text = proc.apply_chat_template(CONVERSATION)
    two = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}]}]
    images = [solid_image("red"), solid_image((0, 0, 255), (84, 56)), solid_image((0, 200, 0), (56, 112))]
    return proc(text=[text, proc.apply_chat_template(two, add_generation_prompt=True)], images=images)


def _hf(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def test_logits_equal_transformers_on_images_of_different_sizes(vl_dir):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(vl_dir))
    batch = _batch(proc)
    if "image_grid_thw" in batch:  # Qwen: each image at its own resolution
        assert len(set(map(tuple, batch["image_grid_thw"].tolist()))) == 3
    assert not batch["attention_mask"].all()  # one row is right-padded
    hf = _hf(vl_dir)
    with torch.no_grad():
        ours = model(**batch).logits
        marks = _oracle_inputs(vl_dir, batch, proc)
        ref = hf(**{**batch, **marks}).logits
        try:  # without the image marks transformers' model sees a different input (Qwen3-VL refuses it)
            unmarked = hf(**batch).logits if marks else None
        except ValueError:
            unmarked = None
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    assert unmarked is None or (ours[real] - unmarked[real]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen_vl_dir", "qwen3_vl_dir"])
def test_positions_equal_transformers_rope_index(family, request):
    from fasttune import FastVisionModel

    folder = request.getfixturevalue(family)
    model, proc = FastVisionModel.from_pretrained(str(folder))
    batch = _batch(proc)
    hf = _hf(folder)
    want, deltas = hf.model.get_rope_index(batch["input_ids"], (batch["input_ids"] == proc.image_token_id).int(),
                                           image_grid_thw=batch["image_grid_thw"],
                                           attention_mask=batch["attention_mask"])
    from fasttune.models.vision_positions import qwen_vl_positions

    got, got_deltas = qwen_vl_positions(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                                        proc.image_token_id, 2)
    real = batch["attention_mask"].bool()
    assert torch.equal(got[:, real], want[:, real])
    assert torch.equal(got_deltas.view(-1), deltas.view(-1))


def test_placeholder_count_must_match_the_images(vl_dir):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(vl_dir))
    batch = _batch(proc)
    cut = {k: v for k, v in batch.items()}
    # cuts row 1 inside its first image (Llama 3.2 Vision: between its two <|image|> tokens; PaliGemma, whose images
    at = 8 if "mllama" in str(vl_dir) else 6 if "paligemma" in str(vl_dir) else 12  # come first: inside the second)
    cut["input_ids"] = batch["input_ids"][:, :at]
    cut["attention_mask"] = batch["attention_mask"][:, :at]
    with pytest.raises(ConfigError, match="image placeholder tokens"):
        model(**cut)
    no_pixels = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    no_pixels["input_ids"] = no_pixels["input_ids"].clone()
    with pytest.raises(ConfigError, match="no pixel_values"):
        model(**no_pixels)


@pytest.mark.parametrize("vision", [False, True, "list"],
                         ids=["language-layers", "vision-and-language-layers", "target-list"])
def test_lora_adapter_loads_in_peft_with_equal_loss_and_gradients(vl_dir, tmp_path, vision):
    """LoRA from the layer-group switches, or from a target_modules list whose names PEFT's suffix rule would also
    find in the vision tower (Qwen2.5-VL's and Gemma 3's: not adapted, so the saved config keeps the names to the
    language model): the saved adapter is PEFT's on transformers' VLM (same layers, same keys; Qwen3-VL-MoE's
    experts as target_parameters), and loss and LoRA gradients equal PEFT's on an image + text batch."""
    from peft import PeftModel

    from fasttune import FastVisionModel
    from fasttune.peft.adapter_io import adapter_parameters

    model, proc = FastVisionModel.from_pretrained(str(vl_dir))
    switches = dict(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]) if vision == "list" \
        else dict(finetune_vision_layers=vision)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **switches)
    with torch.no_grad():  # B != 0 so that A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = _batch(proc)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == proc.image_token_id, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    model.save_pretrained(tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(_hf(vl_dir), str(tmp_path / "adapter"), is_trainable=True)
    ref = peft_model(**{**batch, **_oracle_inputs(vl_dir, batch, proc)}, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
    # under PEFT's keys (adapter_io: Qwen3-VL-MoE's experts as PEFT's parameter wrappers)
    ours = {k: p.grad for k, p in adapter_parameters(model).items()}
    theirs = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    if vision != "list":  # (a list adapts what PEFT's suffix rule finds: Gemma 3's tower q_proj too, as PEFT does)
        assert any(not n.startswith(("base_model.model." + model.language_prefix)) for n in ours) == vision
        assert any(".experts." in n for n in ours) == bool(model.arch.num_experts)
    for name, grad in ours.items():  # atol scaled by the gradient: under -n 2, beside other tests, Qwen3.5-MoE's
        # DeltaNet in_proj_qkv lora_B once differed by 1.3e-5 of its largest entry (fp32 summation order)
        if theirs[name] is None:  # a layer whose output nothing reads (LLaVA's last tower layer): none on either side
            assert grad is None or not grad.any(), name
            continue
        scale = theirs[name].abs().max().item()
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6 + 3e-5 * scale, msg=name)


def test_adapter_folder_keeps_the_processor(vl_dir, tmp_path):
    """An adapter saved with its processor loads back with every placeholder setting of the base's (Gemma 3's image
    sequence, Gemma 4's soft-token marks, Pixtral's row marks, ...) and prepares the same image prompt."""
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(vl_dir))
    FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False).save_pretrained(tmp_path / "a")
    proc.save_pretrained(tmp_path / "a")
    _, again = FastVisionModel.from_pretrained(str(tmp_path / "a"))

    def settings(p):
        return (p.image_token, p.feature_token, p.merge_size, p.image_sequence, p.image_rows, p.soft_token_marks,
                p.audio_marks, p.video_token, p.video_settings, p.video_stamps, p.chat_template)

    assert settings(again) == settings(proc)
    prompt = [[{"type": "image", "image": solid_image("red", (84, 56))}, {"type": "text", "text": "hue?"}]]
    want, got = proc.prompt_inputs(prompt), again.prompt_inputs(prompt)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_merged_checkpoint_loads_in_transformers_with_equal_logits(vl_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(vl_dir))
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained_merged(tmp_path / "merged", proc)
    batch = _batch(proc)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == type(_hf(vl_dir)).__name__
    with torch.no_grad():
        ours = model.eval()(**batch).logits
        ref = merged(**{**batch, **_oracle_inputs(vl_dir, batch, proc)}).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-4, atol=1e-5)
    reloaded, _ = FastVisionModel.from_pretrained(str(tmp_path / "merged"))  # and back, processor included
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits[real], ours[real], rtol=1e-4, atol=1e-5)


def test_merged_4bit_is_a_bitsandbytes_checkpoint_with_a_16_bit_tower(vl_train_dir, tmp_path):
    """save_method="merged_4bit": the language model's merged linears in NF4, the vision modules 16-bit (named in
    llm_int8_skip_modules); transformers + bitsandbytes and our load_in_4bit=True give equal logits on images."""
    from transformers import AutoModelForImageTextToText

    from fasttune import FastVisionModel
    from fasttune.export.merged import merged_state_dict
    from fasttune.quant.nf4 import quantize_nf4

    model, proc = FastVisionModel.from_pretrained(str(vl_train_dir), dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained_merged(tmp_path / "m4", proc, save_method="merged_4bit")
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "m4", device_map="cpu", dtype=torch.float32)
    ref.train()  # as tests/models/test_loading_quantized.py: no bf16 inference kernel of bitsandbytes on the CPU
    kinds = {type(m).__name__ for n, m in ref.named_modules()
             if n.startswith(("model.visual.", "model.vision_tower.", "model.vision_model.", "model.multi_modal_proj"))}
    assert "Linear" in kinds and "Linear4bit" not in kinds
    assert type(ref.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ours, _ = FastVisionModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=True, dtype=torch.float32)
    batch = _batch(proc)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        theirs = ref(**{**batch, **_oracle_inputs(vl_train_dir, batch, proc)}).logits
        torch.testing.assert_close(ours(**batch).logits[real], theirs[real], rtol=1e-5, atol=1e-5)
    name = "model.language_model.layers.1.mlp.up_proj.weight"  # the NF4 of the merged (base + LoRA) weight
    assert torch.equal(ours.model.layers[1].mlp.up_proj.packed,
                       quantize_nf4(merged_state_dict(model, torch.float32)[name]).packed)


def test_load_in_4bit_quantises_the_language_model(vl_dir):
    """QLoRA on a vision-language model: the decoder's linears are NF4, the vision tower stays as loaded, and the
    loss on an image batch stays near the 16/32-bit model's (NF4 rounding only)."""
    from fasttune import FastVisionModel
    from fasttune.quant.linear import QuantLinear

    losses = []
    for four_bit in (False, True):
        model, proc = FastVisionModel.from_pretrained(str(vl_dir), load_in_4bit=four_bit)
        model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
        batch = _batch(proc)
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == proc.image_token_id, -100)
        out = model(**batch, labels=labels.masked_fill(batch["attention_mask"] == 0, -100))
        out.loss.backward()
        losses.append(out.loss.item())
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantised and all(n.startswith("model.layers.") for n in quantised)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert abs(losses[1] - losses[0]) < 0.05 * losses[0]


def test_text_only_calls_behave_as_the_tokenizer(qwen_vl_dir):
    """Without images the processor calls its tokenizer, on a batch of one for a single string as transformers'
    processors do (chat, fast_generate and the CLI's samples encode through its tokenizer), and a text-only prompt
    generates on the vision model."""
    from fasttune import FastVisionModel
    from fasttune.generate import generate_text

    model, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir))
    assert proc("abc", add_special_tokens=False) == proc.tokenizer(["abc"], add_special_tokens=False)
    assert proc(["a", "bc"])["input_ids"] == proc.tokenizer(["a", "bc"])["input_ids"]
    reply = generate_text(model, proc, "hello", max_new_tokens=4)
    assert isinstance(reply, str)
    with_image = proc(text=[proc.apply_chat_template(CONVERSATION)], images=[solid_image("red")])
    assert torch.is_tensor(with_image["input_ids"]) and "pixel_values" in with_image


def test_fast_false_names_the_way_out(qwen_vl_dir):
    from fasttune import FastVisionModel
    from fasttune.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="vision-language model.*leave fast at True"):
        FastVisionModel.from_pretrained(str(qwen_vl_dir), fast=False)


def test_generate_with_images_equals_full_forwards(vl_dir):
    """Greedy KV-cache generation from an image prompt (left-padded batch of two) gives the tokens that re-running
    the whole sequence each step gives: the cached steps continue the images' positions (rope deltas)."""
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(vl_dir))
    model.eval()
    contents = [[{"type": "image", "image": solid_image("red")}, {"type": "text", "text": "colour?"}],
                [{"type": "text", "text": "and"}, {"type": "image", "image": solid_image((0, 0, 255), (84, 56))}]]
    batch = proc.prompt_inputs(contents)
    assert not batch["attention_mask"].all()  # left padding in one row
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(5):
            # Gemma 3's plain positions count from each row's first real token, as generate's do
            plain = None if "image_grid_thw" in batch else (mask.cumsum(-1) - 1).clamp(min=0)
            media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            if model.family.prefix_lm:  # PaliGemma: the prompt is the prefix (two-way), the new tokens the suffix
                media["token_type_ids"] = (torch.arange(ids.shape[1]) >= batch["input_ids"].shape[1]).long()[None]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=plain, **media).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


def test_a_named_template_on_the_processor_places_images(qwen_vl_dir):
    """get_chat_template(processor, NAME), as the peer's vision notebooks call it: image items render as the
    processor's placeholder (Qwen's inside its vision marks), so rows with images still expand."""
    from fasttune import FastVisionModel
    from fasttune.chat_templates import get_chat_template

    _, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir))
    proc = get_chat_template(proc, "chatml")
    text = proc.apply_chat_template(CONVERSATION)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" in text
    batch = proc(text=[text], images=[solid_image("red")])
    assert "pixel_values" in batch and int((batch["input_ids"] == proc.image_token_id).sum()) > 1



class _Counted:
    """An image processor that counts its runs (attributes pass through)."""

    def __init__(self, inner):
        self.inner, self.runs = inner, 0

    def __call__(self, *args, **kwargs):
        self.runs += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_processor_call_runs_the_image_processor_once(vl_dir):
    """processor(text=..., images=...) takes the placeholder counts from the image-processor run that makes the
    pixels, and gives what two runs gave."""
    from fasttune import FastVisionModel

    _, proc = FastVisionModel.from_pretrained(str(vl_dir))
    texts = [proc.apply_chat_template(CONVERSATION)]
    images = [solid_image("red"), solid_image("blue", (40, 60))][:texts[0].count(proc.image_token)]
    grids = proc.image_grids(images)
    pixels = proc.process_images(images)
    counted = proc.image_processor = _Counted(proc.image_processor)
    got = proc(text=texts, images=images)
    assert counted.runs == 1
    assert torch.equal(got["input_ids"], proc.tokenizer(proc.expand(texts[0], grids), add_special_tokens=False,
                                                        return_tensors="pt")["input_ids"])
    assert set(pixels) <= set(got) and all(torch.equal(got[k], v) for k, v in pixels.items())
