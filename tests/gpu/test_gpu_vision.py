"""GPU checks (skipped without CUDA) of vision-language models on our decoder against transformers on the card:
Gemma 4 (its tower, embedder and two-way image attention in the sliding layers; E2B's per-layer embeddings), Mistral 3
(Pixtral tower, Ministral 3's query scaling) and Mistral Small 4 (the same tower before latent attention and
experts), SmolVLM (Idefics3 / SmolVLM2 tiles), InternVL (pixel-shuffled patches), LLaVA (CLIP), Llama 3.2 Vision
(cross-attention layers: the batch's image mask and, in generation, the cached image keys / values), and Gemma 4 E2B
with audio clips beside the images: bf16 logits on such batches no further from fp32 than
transformers' own bf16, and greedy fp32 decoding from such prompts equal to transformers'."""
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vision import (mllama_cross_mask, save_gemma4, save_idefics3, save_internvl, save_llava, save_llava_next,
                         save_llava_onevision, save_mistral3, save_mllama, save_paligemma, save_smolvlm,
                         solid_image)

from fasttune import FastVisionModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

E2B = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
           hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, num_kv_shared_layers=2)
SAVERS = {"gemma4": lambda f: save_gemma4(f), "gemma4_e2b": lambda f: save_gemma4(f, **E2B),
          "gemma4_e2b_audio": lambda f: save_gemma4(f, audio=True, **E2B),
          "mistral3": lambda f: save_mistral3(f), "mistral4": lambda f: save_mistral3(f, text_type="mistral4"),
          "idefics3": lambda f: save_idefics3(f), "smolvlm": lambda f: save_smolvlm(f),
          "internvl": lambda f: save_internvl(f), "llava": lambda f: save_llava(f),
          "llava_next": lambda f: save_llava_next(f), "llava_onevision": lambda f: save_llava_onevision(f),
          "mllama": lambda f: save_mllama(f), "paligemma": lambda f: save_paligemma(f),
          "paligemma2": lambda f: save_paligemma(f, text_type="gemma2")}


def _setup(family, folder, dtype):
    from transformers import AutoModelForImageTextToText

    saved = SAVERS[family](folder)
    model, proc = FastVisionModel.from_pretrained(str(saved), dtype=dtype, device="cuda")
    heard = [{"type": "audio", "audio": (np.random.default_rng(0).standard_normal(12000) * 0.1).astype(np.float32)}] \
        if family.endswith("audio") else []
    batch = proc.prompt_inputs([[{"type": "image", "image": solid_image("red")}, {"type": "text", "text": "hue?"}],
                                [{"type": "text", "text": "and"},
                                 {"type": "image", "image": solid_image((0, 0, 255), (84, 56))}, *heard]])
    batch = {k: v.to("cuda") for k, v in batch.items()}
    marks = {} if family.startswith(("mistral", "internvl", "llava")) else {
        "mm_token_type_ids": (batch["input_ids"] == proc.image_token_id).long()}
    if family == "mllama":  # MllamaProcessor's cross_attention_mask, by transformers' functions
        marks = {"cross_attention_mask": mllama_cross_mask({k: v.cpu() for k, v in batch.items()}).to("cuda")}
    if family.startswith("paligemma"):  # a prompt is all prefix (two-way), as PaliGemmaProcessor marks it
        marks = {"token_type_ids": torch.zeros_like(batch["input_ids"])}
    if family in ("idefics3", "smolvlm"):  # transformers' layout of the tiles: (rows, images, C, H, W)
        marks = {"pixel_values": batch["pixel_values"][None],
                 "pixel_attention_mask": batch["pixel_attention_mask"][None]}
    load = lambda d: AutoModelForImageTextToText.from_pretrained(saved, dtype=d).to("cuda").eval()  # noqa: E731
    return model, batch, marks, load


def _assert_bf16_close(model, batch: dict, marks: dict, load):
    """Our bf16 logits on `batch` no further from transformers' fp32 ones than transformers' own bf16 (x 1.5)."""
    with torch.no_grad():
        ours = model(**batch).logits.float()
        ref = load(torch.bfloat16)(**{**batch, **marks}).logits.float()
        exact = load(torch.float32)(**{k: v.float() if v.is_floating_point() else v
                                       for k, v in {**batch, **marks}.items()}).logits
    real = batch["attention_mask"].bool()
    ours_err = (ours - exact)[real].norm() / exact[real].norm()
    ref_err = (ref - exact)[real].norm() / exact[real].norm()
    assert ours_err < 1.5 * ref_err + 1e-3, (ours_err, ref_err)


@pytest.mark.parametrize("family", sorted(SAVERS))
def test_bf16_image_logits_close_to_transformers_bf16(family, tmp_path):
    model, batch, marks, load = _setup(family, tmp_path / family, torch.bfloat16)
    _assert_bf16_close(model, batch, marks, load)


@pytest.mark.parametrize("family", ["gemma4", "qwen3_vl", "llava_onevision"])
def test_bf16_video_rows_close_to_transformers_bf16(family, tmp_path):
    """Prompts with videos from our processor (data/video.py: Qwen3-VL's timestamped frame runs, Gemma 4's frames at
    the video budget, LLaVA-OneVision's pooled frames) through our bf16 model on the card, against transformers' bf16
    and fp32 on the same batch."""
    from transformers import (AutoModelForImageTextToText, Gemma4ForConditionalGeneration,
                              Qwen3VLForConditionalGeneration)
    from tiny_vision import (gemma4_config, gemma4_video_processor, patterned_frames, qwen3_vl_config,
                             qwen3_vl_video_processor, save_llava_onevision_video, save_video_model)

    if family == "llava_onevision":
        folder = save_llava_onevision_video(tmp_path / "m")
    else:
        cls, config, processor = {
            "gemma4": (Gemma4ForConditionalGeneration, gemma4_config(video=True), gemma4_video_processor()),
            "qwen3_vl": (Qwen3VLForConditionalGeneration, qwen3_vl_config(), qwen3_vl_video_processor())}[family]
        folder = save_video_model(tmp_path / "m", cls, config, processor)
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda")
    frames = [Image.fromarray(f) for f in patterned_frames(4, 48, 64)]
    # (transformers' OneVision takes videos of one length in a batch)
    second = frames[2:] if family == "llava_onevision" else frames[:2]
    first = frames[:2] if family == "llava_onevision" else frames
    batch = proc.prompt_inputs([[{"type": "video", "video": first, "fps": 2}, {"type": "text", "text": "what?"}],
                                [{"type": "text", "text": "and"}, {"type": "video", "video": second}]])
    batch = {k: v.to("cuda") for k, v in batch.items()}
    marks = {} if family == "llava_onevision" else {
        "mm_token_type_ids": 2 * (batch["input_ids"] == proc.video_token_id).long()}
    load = lambda d: AutoModelForImageTextToText.from_pretrained(folder, dtype=d).to("cuda").eval()  # noqa: E731
    _assert_bf16_close(model, batch, marks, load)


@pytest.mark.parametrize("family", sorted(SAVERS))
def test_greedy_fp32_from_image_prompts_equals_transformers(family, tmp_path):
    model, batch, marks, load = _setup(family, tmp_path / family, torch.float32)
    want = load(torch.float32).generate(**{**batch, **marks}, max_new_tokens=12, do_sample=False, pad_token_id=0)
    # (stopped rows padded with the same id on both sides: the tiny SmolVLMs stop a row within the 12 tokens)
    assert torch.equal(model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=0), want)


def _tower_gradients(tmp_path, seed: int) -> tuple[float, float, dict, dict, dict]:
    """Gemma 4 E2B with LoRA on the decoder and both towers, LoRA B drawn with `seed`, one batch with images and a
    clip: (our bf16 loss, PEFT's bf16 loss, and the tower adapters' gradients: ours bf16, PEFT bf16, PEFT fp32)."""
    from peft import PeftModel

    from fasttune.peft.adapter_io import adapter_parameters

    model, batch, marks, load = _setup("gemma4_e2b_audio", tmp_path / "m", torch.bfloat16)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                           finetune_audio_layers=True, finetune_vision_layers=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    model.save_pretrained(tmp_path / "adapter")

    def peft_run(dtype, inputs):
        peft_model = PeftModel.from_pretrained(load(dtype), str(tmp_path / "adapter"), is_trainable=True)
        out = peft_model(**inputs, **marks, labels=labels).loss
        out.backward()
        return float(out), {n.replace(".default", ""): p.grad.float() for n, p in peft_model.named_parameters()
                            if p.requires_grad}

    ref_loss, theirs = peft_run(torch.bfloat16, batch)
    _, exact = peft_run(torch.float32, {k: v.float() if v.is_floating_point() else v for k, v in batch.items()})
    ours = {k: p.grad.float() for k, p in adapter_parameters(model).items()
            if ".audio_tower." in k or ".vision_tower." in k or ".embed_" in k}
    return loss.item(), ref_loss, ours, {k: theirs[k] for k in ours}, {k: exact[k] for k in ours}


def test_bf16_towers_lora_loss_and_gradients_close_to_peft(tmp_path):
    """Gemma 4 E2B with LoRA on the decoder and both towers (finetune_audio_layers / finetune_vision_layers) in bf16
    on the card: the loss within 1% of PEFT's on transformers' bf16 model, and the tower adapters' gradients (all of
    them as one vector) as close to PEFT's fp32 gradients as PEFT's own bf16 ones, over four draws of LoRA B. One
    draw, or a mean of per-adapter cosines, is no measure here: the tiny vision tower's attention adapters get
    gradients of ~1e-7 (their cosine to fp32 is noise for PEFT too), and single adapters swing either way between
    bf16 runs with different rounding orders (our torch reference path as much as our kernels)."""
    def err(grads, exact):
        return float(sum((grads[k] - exact[k]).norm() ** 2 for k in exact) ** 0.5
                     / sum(v.norm() ** 2 for v in exact.values()) ** 0.5)

    mine, peft = [], []
    for seed in range(4):
        loss, ref, ours, theirs, exact = _tower_gradients(tmp_path / str(seed), seed)
        assert abs(loss - ref) < 0.01 * ref, (seed, loss, ref)
        assert any(".audio_tower." in k for k in exact) and any(".vision_tower." in k for k in exact)
        mine.append(err(ours, exact))
        peft.append(err(theirs, exact))
    print("tower gradients' relative error to fp32, per draw: ours", mine, "PEFT", peft)
    assert sum(mine) < 1.5 * sum(peft) + 4e-3, (mine, peft)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "mllama", "paligemma"])
def test_bf16_packed_rows_match_each_document_alone(family, tmp_path):
    """packing=True on the card: a packed row (Qwen: varlen attention over its documents; Gemma 3: the dense mask with
    its two-way image blocks; Llama 3.2 Vision: each document's cross-attention to its own images; PaliGemma: each
    document's prefix) gives each document's bf16 logits within bf16 noise of the document alone."""
    from tiny_vision import save_gemma3, save_qwen_vl

    from fasttune.data.packing import pack_examples
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    folder = {"qwen2_5_vl": save_qwen_vl, "gemma3": save_gemma3, "mllama": save_mllama,
              "paligemma": save_paligemma}[family](tmp_path / family)
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": solid_image(color)},
                                                       {"type": "text", "text": "hue?" * k}]},
                          {"role": "assistant", "content": "a colour " * k}]}
            for k, color in ((1, "red"), (3, (0, 0, 255)), (2, (0, 255, 0)))]
    encoder = VisionEncoder(proc, 1024, train_on_responses_only=False)
    examples = [encoder.encode(row, i) for i, row in enumerate(rows)]
    packed = pack_examples(examples, 4096)
    order = sorted(examples, key=lambda e: -len(e["input_ids"]))
    batch = {k: v.to("cuda") for k, v in collate_vision(packed, proc).items()}
    with torch.no_grad():
        out = model(**batch).logits.float()
        for k, example in enumerate(order):
            alone = model(**{key: v.to("cuda") for key, v in collate_vision([example], proc).items()}).logits.float()
            got = out[0, batch["segment_ids"][0] == k + 1]
            assert (got - alone[0]).norm() / alone[0].norm() < 2e-2
