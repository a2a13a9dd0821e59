"""What is particular to PaliGemma among the vision-language families: the prefix-LM layout (the images' tokens, <bos>,
the prompt and "\\n" as the prefix, attending both ways; the answer and <eos> as the suffix, causal and the only
target), rows collated exactly as transformers' PaliGemmaProcessor lays out a prompt and its suffix, the logits of
both layouts (and of PaliGemma 2's sliding layer, whose window the prefix crosses) and greedy generation equal
transformers'. Logits, LoRA against PEFT, merging, 4-bit, generation, packing and the SFT loss curve also run in the
shared vision tests (tests/conftest.py's vl_dir), and DPO's loss curve and GRPO's step (completions as the suffix)
in tests/train/objectives/test_dpo_vision.py and test_grpo_vision.py."""
import copy

import pytest
import torch
from tiny_vision import noise_image



def _rows(images, answers=("a cat", "dog dog")):
    prompts = ("caption en", "what is it?")
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": p}]},
                          {"role": "assistant", "content": a}]} for im, p, a in zip(images, prompts, answers)]


def _hf_processor(proc):
    from transformers import PaliGemmaProcessor

    images = copy.deepcopy(proc.image_processor)
    images.image_seq_length = 4
    return PaliGemmaProcessor(image_processor=images, tokenizer=copy.deepcopy(proc.tokenizer))


@pytest.fixture(params=["paligemma_vl_dir", "paligemma2_vl_dir"], ids=["paligemma", "paligemma2"])
def loaded(request):
    from transformers import PaliGemmaForConditionalGeneration

    from fasttune import FastVisionModel

    folder = request.getfixturevalue(request.param)
    model, proc = FastVisionModel.from_pretrained(str(folder))
    return model, proc, PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()


def test_rows_collate_as_paligemma_processor_and_logits_equal(loaded):
    """Our collator (train_on_responses_only off: the answers are still the only targets) gives PaliGemmaProcessor's
    input_ids, token_type_ids, labels and pixels; the logits of that batch equal transformers' at every real
    position, and the prefix matters: without its two-way attention (every token causal) they differ."""
    from fasttune.data.vision_rows import VisionDataCollator

    model, proc, hf = loaded
    images = [noise_image((28, 28), 1), noise_image((28, 28), 2)]
    ours = VisionDataCollator(model, proc, train_on_responses_only=False)(_rows(images))
    want = _hf_processor(proc)(images=images, text=["caption en", "what is it?"], suffix=["a cat", "dog dog"],
                               return_tensors="pt", padding="longest")
    for key in ("input_ids", "token_type_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(ours[key], want[key]), key
    inputs = {k: v for k, v in ours.items() if k != "labels"}
    with torch.no_grad():
        got, ref = model(**inputs).logits, hf(**inputs).logits
        causal = model(**{**inputs, "token_type_ids": torch.ones_like(inputs["token_type_ids"])}).logits
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert (got[real] - causal[real]).abs().max() > 1e-3
    with torch.no_grad():  # and the loss, over the answers only
        assert float(model(**ours).loss) == pytest.approx(float(hf(**want).loss), rel=1e-5)


def test_greedy_generation_equals_transformers(loaded):
    model, proc, hf = loaded
    prompt = _hf_processor(proc)(images=[noise_image((28, 28), 3)], text=["caption en"], return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**prompt, max_new_tokens=6, do_sample=False), want)
