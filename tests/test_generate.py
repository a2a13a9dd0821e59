"""KV-cache generation: greedy equals transformers' generate() token for token (tiny models of every family, with
and without left padding), cached logits equal a full forward, sampling options, and the real SmolLM2 (slow)."""
import pytest
import torch
from tiny import FAMILIES, hf_model, save_hf

from fasttune.errors import ConfigError
from fasttune.generate import generate, generate_text, sample_next
from fasttune.models.decoder import KVCache
from fasttune.models.loading import load_model

STOPS = [7, 9]


def _pair(family, tmp_path, **overrides):
    hf = hf_model(family, **overrides)
    ours, _ = load_model(save_hf(hf, tmp_path / family), torch.float32, "cpu")
    return hf, ours


def _left_padded_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_equals_transformers(family, padded, tmp_path):
    hf, ours = _pair(family, tmp_path)
    ids, mask = _left_padded_batch()
    if not padded:
        mask = torch.ones_like(ids)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=STOPS,
                      pad_token_id=0)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=STOPS, pad_token_id=0)
    assert torch.equal(got, ref)
    got_method = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               eos_token_id=STOPS, pad_token_id=0)
    assert torch.equal(got_method, ref)


def test_greedy_sliding_window_beyond_window_equals_transformers(tmp_path):
    hf, ours = _pair("mistral", tmp_path, sliding_window=3)
    ids, mask = _left_padded_batch()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                      eos_token_id=STOPS)
    assert torch.equal(generate(ours, ids, mask, max_new_tokens=10, eos_token_id=STOPS, pad_token_id=0), ref)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_cached_logits_equal_full_forward(family, tmp_path):
    """Prefill + one token at a time through the cache gives the logits of one forward over the whole sequence."""
    _, ours = _pair(family, tmp_path)
    ids, mask = _left_padded_batch()
    extra = torch.randint(3, 300, (3, 5), generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = ours(full_ids, attention_mask=full_mask, position_ids=positions).logits
        cache = KVCache(ours.config, 3, full_ids.shape[1], torch.float32, "cpu")
        steps = [ours(ids, attention_mask=mask, position_ids=positions[:, :7], past_key_values=cache).logits]
        for i in range(7, full_ids.shape[1]):
            steps.append(ours(full_ids[:, i:i + 1], attention_mask=full_mask[:, :i + 1],
                              position_ids=positions[:, i:i + 1], past_key_values=cache).logits)
    got = torch.cat(steps, 1)
    valid = full_mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert cache.length == full_ids.shape[1]


def test_stopped_rows_are_padded_and_loop_ends(tmp_path):
    _, ours = _pair("llama", tmp_path)
    ids, mask = _left_padded_batch()
    free = generate(ours, ids, mask, max_new_tokens=6)
    first = free[:, 7].tolist()
    out = generate(ours, ids, mask, max_new_tokens=6, eos_token_id=first[0], pad_token_id=-1)
    assert out[0, 7] == first[0] and (out[0, 8:] == -1).all()  # row 0 stopped at once, then padding
    all_stop = generate(ours, ids, mask, max_new_tokens=6, eos_token_id=sorted(set(first)))
    assert all_stop.shape[1] == 8  # every row stopped at its first token: the loop ends there


def test_sampling_options(tmp_path):
    _, ours = _pair("qwen2", tmp_path)
    ids, mask = _left_padded_batch()
    greedy = generate(ours, ids, mask, max_new_tokens=8, eos_token_id=[])
    kw = dict(max_new_tokens=8, do_sample=True, eos_token_id=[])
    assert torch.equal(generate(ours, ids, mask, top_k=1, seed=0, **kw), greedy)
    assert torch.equal(generate(ours, ids, mask, top_p=1e-6, seed=0, **kw), greedy)
    a = generate(ours, ids, mask, temperature=5.0, seed=1, **kw)
    assert torch.equal(a, generate(ours, ids, mask, temperature=5.0, seed=1, **kw))
    assert not torch.equal(a, greedy)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, True, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {2, 3}
    probs = logits.softmax(-1)[0]  # 0.03, 0.09, 0.24, 0.64: top_p 0.8 keeps the best two
    assert probs[3] < 0.8 < probs[3] + probs[2]
    picks = {int(sample_next(logits, True, top_p=0.8, generator=g)) for _ in range(200)}
    assert picks == {2, 3}


def test_bad_arguments(tmp_path):
    _, ours = _pair("llama", tmp_path)
    ids, mask = _left_padded_batch()
    with pytest.raises(ConfigError, match="LEFT-padded"):
        generate(ours, ids, mask.flip(1))
    with pytest.raises(ConfigError, match="top_p"):
        generate(ours, ids, top_p=0.0)
    with pytest.raises(TypeError):
        ours.generate(ids, repetition_penalty=1.2)


def test_generate_text_with_chat_template(tmp_path, tiny_tokenizer):
    _, ours = _pair("llama", tmp_path)
    text = generate_text(ours, tiny_tokenizer, "hi", max_new_tokens=5)
    assert isinstance(text, str)
    assert generate_text(ours, tiny_tokenizer, "hi", max_new_tokens=5, temperature=0.8, seed=1) == \
        generate_text(ours, tiny_tokenizer, "hi", max_new_tokens=5, temperature=0.8, seed=1)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers():
    """The real model, chat prompts of different lengths in one left-padded batch, 24 new tokens. transformers
    runs the same weights (tests/models/test_smollm2_real.py shows they are the ones it reads from the GGUF)."""
    from transformers import AutoModelForCausalLM

    from fasttune import FastLanguageModel
    from fasttune.defaults import default_model_path

    model, tok = FastLanguageModel.from_pretrained(default_model_path())
    hf = AutoModelForCausalLM.from_config(model.hf_config, dtype=torch.float32).eval()
    hf.load_state_dict(model.state_dict())
    prompts = ["What is the capital of France?", "Write a haiku about autumn leaves falling in a quiet park."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=24, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = hf.generate(**batch, do_sample=False, **kw)
    got = model.generate(**batch, **kw)
    assert torch.equal(got, ref)
    longest = int(batch["attention_mask"].sum(1).argmax())  # the row without padding, alone
    single = model.generate(input_ids=batch["input_ids"][longest:longest + 1], **kw)
    assert torch.equal(single, ref[longest:longest + 1, :single.shape[1]])
