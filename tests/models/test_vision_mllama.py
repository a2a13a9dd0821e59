"""What is particular to Llama 3.2 Vision (mllama) among the vision-language families: images reach the text through
cross-attention layers, not as tokens, so the batch carries each row's images (rows, images, tiles, ...) and which
image tiles each text position attends to (MllamaProcessor's cross_attention_mask, which fasttune builds from the
<|image|> tokens; transformers' own functions are the oracle here); rows without images, text-only batches (the
cross-attention layers skipped), recompute with a training tower, and generation's cached image keys and values.
Logits, LoRA against PEFT, merging, 4-bit, generation and the SFT loss curve run in the shared vision tests
(tests/conftest.py's vl_dir)."""
import pytest
import torch
from tiny_vision import mllama_cross_mask, noise_image

from fasttune.errors import ConfigError

IMAGE = 259  # <|image|> in the tiny model


@pytest.fixture(scope="module")
def loaded(mllama_vl_dir):
    from fasttune import FastVisionModel

    return FastVisionModel.from_pretrained(str(mllama_vl_dir), device="cpu")


@pytest.fixture(scope="module")
def hf(mllama_vl_dir):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(str(mllama_vl_dir)).eval()


def _rows(proc):
    """Three prompts: one image then text; text, two adjacent images, text, a third image; text only."""
    images = [noise_image((40, 70), 1), noise_image((60, 30), 2), noise_image((28, 28), 3), noise_image((90, 30), 4)]
    texts = ["<|im_start|>user\n<|image|>what is it?<|im_end|>",
             "<|im_start|>user\nsee<|image|><|image|>these and<|image|>this<|im_end|>\n",
             "<|im_start|>user\nwords only, no picture<|im_end|>"]
    return proc(text=texts, images=images), images


def test_tiles_and_cross_attention_mask_equal_transformers(loaded):
    from fasttune.models.cross_attention import image_token_spans

    _, proc = loaded
    batch, images = _rows(proc)
    want = proc.image_processor(images=[[images[0]], images[1:], []], return_tensors="pt")
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(batch[key], want[key]), key
    assert len(set(batch["aspect_ratio_ids"][:2].flatten().tolist()) - {0}) > 1  # several tilings
    spans = image_token_spans(batch["input_ids"], IMAGE, batch["aspect_ratio_mask"].sum(-1), 4)
    assert torch.equal(spans, mllama_cross_mask(batch))
    first, second, third = (spans[1, :, k, 0].nonzero().flatten().tolist() for k in range(3))
    assert spans[2].sum() == 0 and first[-1] == second[-1] and second[0] == first[0] + 1  # adjacent: one end
    assert third[0] == first[-1] + 1 and third[-1] == spans.shape[1] - 1  # the next image takes over to the end


def test_cross_attention_mask_equals_transformers_on_random_rows():
    from fasttune.models.cross_attention import image_token_spans

    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # runs at the start, at the end, adjacent, lone; rows with no image
        ids = torch.randint(3, 8, (3, 12), generator=gen)
        ids[torch.rand(3, 12, generator=gen) < 0.3] = IMAGE
        images = max(int((ids == IMAGE).sum(1).max()), 1)
        ratio_mask = (torch.arange(4) < torch.randint(1, 5, (3, images, 1), generator=gen)).long()
        batch = {"input_ids": ids, "aspect_ratio_mask": ratio_mask}
        assert torch.equal(image_token_spans(ids, IMAGE, ratio_mask.sum(-1), 4), mllama_cross_mask(batch)), ids


def test_logits_equal_transformers_with_a_row_without_images(loaded, hf):
    model, proc = loaded
    batch, _ = _rows(proc)
    with torch.no_grad():
        ours = model(**batch).logits
        ref = hf(**batch, cross_attention_mask=mllama_cross_mask(batch)).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_a_text_only_batch_skips_the_cross_attention_layers(loaded, hf):
    model, proc = loaded
    batch = proc.tokenizer(["<|im_start|>user\nhello there<|im_end|>"], return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
        ref = hf(**batch).logits
        layer = model.model.layers[model.arch.cross_attention_layers[0]]
        out = layer(torch.randn(1, 3, 64), None, None, {"cross": None})
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert layer.is_cross and out.shape == (1, 3, 64)


def test_image_inputs_are_checked(loaded):
    model, proc = loaded
    batch, _ = _rows(proc)
    with pytest.raises(ConfigError, match="aspect_ratio_ids"):
        model(**{k: v for k, v in batch.items() if k != "aspect_ratio_ids"})
    with pytest.raises(ConfigError, match="images for 3 rows but input_ids has 2"):
        model(**{**batch, "input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]})
    cut = batch["input_ids"].clone()
    cut[1][cut[1] == IMAGE] = 5  # row 1's placeholders gone (cut off), its images still there
    with pytest.raises(ConfigError, match="Row 1 holds 0 image placeholder tokens"):
        model(**{**batch, "input_ids": cut})


@pytest.mark.parametrize("mode", [True, "offload"])
def test_recompute_gives_the_gradients_of_no_recompute_with_a_training_tower(mllama_vl_dir, mode):
    """The image features enter each recomputed cross-attention layer as an input, so the tower's and projector's
    LoRA gradients come out of the recompute (they would be lost, or their graph run twice, as a captured tensor)."""
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(mllama_vl_dir), device="cpu")
    model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=True, random_state=0)
    batch, _ = _rows(proc)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, -100)
    grads = {}
    for setting in (False, mode):
        model.gradient_checkpointing = setting
        model.train()
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("vision_model") for n in grads[False])
    assert any("cross_attn" in n for n in grads[False])
    assert grads[False].keys() == grads[mode].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[mode][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_sampled_copies_of_an_image_prompt_reuse_its_cached_image(loaded):
    """num_return_sequences copies of one prefilled prompt continue from its image keys / values (top_k=1: each
    copy is the greedy continuation)."""
    model, proc = loaded
    contents = [[{"type": "text", "text": "look"}, {"type": "image", "image": noise_image((60, 30), 5)}],
                [{"type": "text", "text": "and words alone, longer"}]]
    batch = proc.prompt_inputs(contents)
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False)
    sampled = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=2, seed=0)
    assert torch.equal(sampled[0::2], greedy) and torch.equal(sampled[1::2], greedy)


def test_packed_training_and_the_refusals(loaded, mllama_vl_dir, tmp_path):
    """SFTTrainer(packing=True) trains on packed rows (each document attends its own images, tests/models/
    test_vision_packing.py); a processor's cross_attention_mask with packed rows, adding tokens and GGUF are refused
    by name."""
    from fasttune import FastVisionModel, SFTConfig, SFTTrainer
    from fasttune.data.packing import pack_examples
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = loaded
    lora, _ = FastVisionModel.from_pretrained(str(mllama_vl_dir), device="cpu")
    lora = FastVisionModel.get_peft_model(lora, r=4)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": noise_image((28, 28), 6 + i)},
                                                       {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": "noise"}]} for i in range(4)]
    trainer = SFTTrainer(model=lora, processing_class=proc, train_dataset=rows,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), packing=True, max_steps=1, report_to="none",
                                        per_device_train_batch_size=1, gradient_accumulation_steps=1))
    assert len(trainer.train_examples) == 1 and len(trainer.train_examples[0]["images"]) == 4
    result = trainer.train()
    assert result["global_step"] == 1 and torch.isfinite(torch.tensor(result["train_loss"]))
    encoder = VisionEncoder(proc, 256, train_on_responses_only=False)
    batch = collate_vision(pack_examples([encoder.encode(r, i) for i, r in enumerate(rows[:2])], 256), proc)
    given = torch.ones(*batch["input_ids"].shape, 2, batch["aspect_ratio_mask"].shape[-1], dtype=torch.long)
    with pytest.raises(ConfigError, match="Packed rows .* take no cross_attention_mask"):
        model(**batch, cross_attention_mask=given)
    with pytest.raises(ConfigError, match="8 rows past its 259-token vocabulary"):
        model.resize_token_embeddings(len(proc.tokenizer) + 1)
    with pytest.raises(ConfigError, match="cross-attention layers"):
        model.save_pretrained_gguf(str(tmp_path / "gguf"), proc, quantization_method="f16")
    assert not (tmp_path / "gguf").exists()


def test_the_memory_estimate_counts_each_image_as_its_tiles(loaded):
    from fasttune.models.vision_families import patches_per_token

    model, _ = loaded
    assert patches_per_token(model.family, model.hf_config) == 4 * ((28 // 14) ** 2 + 1)


def test_merged_4bit_keeps_the_projector_16_bit(mllama_vl_dir, tmp_path):
    """save_method="merged_4bit": the projector, a bare Linear under a vision module's own name, stays 16-bit with
    the tower (bitsandbytes' llm_int8_skip_modules names it), so transformers + bitsandbytes load the checkpoint
    and give our load_in_4bit=True logits."""
    from transformers import MllamaForConditionalGeneration

    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(mllama_vl_dir), dtype=torch.float32, device="cpu")
    model = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    model.save_pretrained_merged(tmp_path / "m4", proc, save_method="merged_4bit")
    ref = MllamaForConditionalGeneration.from_pretrained(tmp_path / "m4", device_map="cpu", dtype=torch.float32)
    ref.train()  # (no bf16 inference kernel of bitsandbytes on the CPU, as in test_vision.py)
    assert type(ref.model.multi_modal_projector).__name__ == "Linear"
    assert type(ref.model.language_model.layers[1].cross_attn.q_proj).__name__ == "Linear4bit"
    ours, _ = FastVisionModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=True, dtype=torch.float32,
                                              device="cpu")
    batch, _ = _rows(proc)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        theirs = ref(**batch, cross_attention_mask=mllama_cross_mask(batch)).logits
        torch.testing.assert_close(ours(**batch).logits[real], theirs[real], rtol=1e-5, atol=1e-5)
