"""model.fast_generate / save_lora / load_lora: the GRPO notebooks' vLLM calls on fasttune's own generate."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.generate import generate, generate_text, left_pad, stop_token_ids


@pytest.fixture
def loaded(tiny_model_dir):
    return FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), device="cpu")


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def test_greedy_equals_generate(loaded):
    model, tok = loaded
    prompts = [_chat(tok, "hi"), _chat(tok, "a longer question here")]
    out = model.fast_generate(prompts, {"temperature": 0, "max_tokens": 6})
    assert [o.prompt for o in out] == prompts
    for o, text in zip(out, ["hi", "a longer question here"]):
        assert o.outputs[0].text == generate_text(model, tok, text, max_new_tokens=6)
    # The batch (left-padded) equals generate on the same batch, token for token.
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = left_pad(rows, tok.pad_token_id)
    stops = stop_token_ids(tok, model)
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=stops)
    for i, o in enumerate(out):
        expect = ref[i, ids.shape[1]:].tolist()
        got = o.outputs[0].token_ids
        assert got == expect[:len(got)]
        assert o.outputs[0].finish_reason == ("stop" if got[-1] in stops else "length")


def test_sampling_object_n_seed_and_length(loaded):
    model, tok = loaded
    params = SimpleNamespace(temperature=0.9, top_p=0.95, top_k=-1, min_p=0.05, max_tokens=5, seed=7, n=2,
                             repetition_penalty=1.1, ignore_eos=True)
    a = model.fast_generate(_chat(tok, "hello"), params, use_tqdm=False)
    b = model.fast_generate([_chat(tok, "hello")], params)
    assert len(a) == 1 and len(a[0].outputs) == 2
    assert [o.token_ids for o in a[0].outputs] == [o.token_ids for o in b[0].outputs]
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in a[0].outputs)
    assert [o.index for o in a[0].outputs] == [0, 1]


def test_stop_strings(loaded):
    model, tok = loaded
    prompt = _chat(tok, "hello")
    full = model.fast_generate(prompt, {"temperature": 0, "max_tokens": 12, "ignore_eos": True})[0].outputs[0]
    assert len(full.text) >= 3
    stop = full.text[1:3]
    cut = model.fast_generate(prompt, {"temperature": 0, "max_tokens": 12, "ignore_eos": True,
                                       "stop": [stop]})[0].outputs[0]
    at = full.text.find(stop)
    assert cut.text == full.text[:at] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < 12
    kept = model.fast_generate(prompt, {"temperature": 0, "max_tokens": 12, "ignore_eos": True, "stop": stop,
                                        "include_stop_str_in_output": True})[0].outputs[0]
    assert kept.text == full.text[:at + len(stop)]


def test_save_lora_load_lora(loaded, tiny_model_dir, tmp_path):
    model, tok = loaded
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_lora(tmp_path / "grpo_lora")
    direct, _ = FastLanguageModel.from_pretrained(str(tmp_path / "grpo_lora"), device="cpu")
    # The training model moves on (different LoRA weights); the saved adapter is used only for the call.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [_chat(tok, "hi"), _chat(tok, "what is two plus two")]
    params = {"temperature": 0, "max_tokens": 8}
    with_lora = model.fast_generate(prompts, params, lora_request=model.load_lora(tmp_path / "grpo_lora"))
    direct.fast_tokenizer = tok
    ref = direct.fast_generate(prompts, params)
    assert [o.outputs[0].token_ids for o in with_lora] == [o.outputs[0].token_ids for o in ref]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    own = model.fast_generate(prompts, params)
    assert [o.outputs[0].token_ids for o in own] != [o.outputs[0].token_ids for o in ref]


@pytest.mark.parametrize("params, match", [
    ({"temprature": 0.5}, "unknown sampling field 'temprature'.*Did you mean 'temperature'"),
    ({"presence_penalty": 0.5}, "presence_penalty=0.5 is not supported"),
    ({"top_k": -2}, "top_k=-2 is invalid"),
    ({"max_tokens": 0}, "max_tokens=0 is invalid"),
])
def test_bad_sampling_fields(loaded, params, match):
    model, tok = loaded
    with pytest.raises(ConfigError, match=match):
        model.fast_generate("hi", params)


def test_vllm_fields_at_defaults_are_accepted(loaded):
    """A SamplingParams object carries every vLLM field; those not implemented pass at their defaults."""
    model, _ = loaded
    params = SimpleNamespace(temperature=0.0, max_tokens=2, presence_penalty=0.0, logprobs=None, detokenize=True,
                             output_kind=0, best_of=None)
    assert len(model.fast_generate("hi", params)[0].outputs[0].token_ids) <= 2
    with pytest.raises(ConfigError, match="no LoRA layers|has none"):
        model.fast_generate("hi", params, lora_request=SimpleNamespace(lora_path="nowhere"))


def test_transformers_fallback(tiny_model_dir):
    """fast=False models generate through transformers; adapter swapping is refused there with a ConfigError."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), fast=False, device="cpu")
    out = model.fast_generate([_chat(tok, "hi")], {"temperature": 0, "max_tokens": 4})
    assert out[0].outputs[0].text == model.sample_text(tok, "hi", max_new_tokens=4)
    with pytest.raises(ConfigError, match="fasttune's own decoder only"):
        model.load_lora("anywhere")
