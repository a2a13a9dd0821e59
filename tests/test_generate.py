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
        cache = KVCache(ours.arch, 3, full_ids.shape[1], torch.float32, "cpu")
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
    with pytest.raises(ConfigError, match="max_length=5 counts the prompt"):
        generate(ours, ids, max_length=5)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return _pair("llama", tmp_path_factory.mktemp("gen"))


def _both(pair, ids, mask, **kw):
    """(transformers' generate, ours) on the same weights and arguments."""
    hf, ours = pair
    return hf.generate(input_ids=ids, attention_mask=mask, **kw), ours.generate(input_ids=ids, attention_mask=mask,
                                                                                **kw)


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.5, max_new_tokens=12),
    dict(repetition_penalty=0.7, max_new_tokens=12, eos_token_id=STOPS),
    dict(max_new_tokens=10, use_cache=True, temperature=1.5, min_p=0.1, top_k=3),  # no do_sample: greedy
    dict(max_length=12),  # total length, prompt included
    dict(max_length=12, max_new_tokens=5),  # max_new_tokens wins
    dict(max_new_tokens=6, eos_token_id=9, pad_token_id=2),
    dict(max_new_tokens=6, use_cache=False, num_beams=1, penalty_alpha=None),  # no-op values are accepted
], ids=["penalty", "penalty<1", "greedy-ignores-sampling-args", "max_length", "both-lengths", "int-eos", "no-ops"])
def test_transformers_arguments_equal_transformers(kw, llama_pair):
    ids, mask = _left_padded_batch()
    ref, got = _both(llama_pair, ids, mask, pad_token_id=kw.pop("pad_token_id", 0), **kw)
    assert torch.equal(got, ref)


def test_min_new_tokens_and_list_eos_equal_transformers(llama_pair):
    """The first greedy tokens become stop ids: without min_new_tokens every row stops at once; with it, stop ids
    are suppressed for 3 tokens, as in transformers."""
    ids, mask = _left_padded_batch()
    first = sorted(set(generate(llama_pair[1], ids, mask, max_new_tokens=1)[:, -1].tolist()))
    ref, got = _both(llama_pair, ids, mask, max_new_tokens=8, eos_token_id=first, pad_token_id=0)
    assert got.shape[1] == 8 and torch.equal(got, ref)
    ref, got = _both(llama_pair, ids, mask, max_new_tokens=8, eos_token_id=first, pad_token_id=0, min_new_tokens=3,
                     repetition_penalty=1.2)
    assert torch.equal(got, ref)
    assert not any(t in first for t in got[:, 7:10].flatten().tolist())
    ref, got = _both(llama_pair, ids, mask, max_new_tokens=8, eos_token_id=first, pad_token_id=0, min_length=10)
    assert torch.equal(got, ref)


def test_generation_config_defaults_and_overrides(llama_pair):
    from transformers import GenerationConfig

    ids, mask = _left_padded_batch()
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.4, eos_token_id=STOPS, pad_token_id=0)
    ref, got = _both(llama_pair, ids, mask, generation_config=config)
    assert got.shape[1] == 13 and torch.equal(got, ref)
    ref, got = _both(llama_pair, ids, mask, generation_config=config, max_new_tokens=3)  # keyword wins
    assert got.shape[1] == 10 and torch.equal(got, ref)
    # do_sample comes from the config too; top_k=1 leaves one candidate, so the draw is the greedy token
    sampled = llama_pair[1].generate(ids, mask, generation_config=GenerationConfig(
        do_sample=True, top_k=1, temperature=0.5, max_new_tokens=6), eos_token_id=[])
    assert torch.equal(sampled, generate(llama_pair[1], ids, mask, max_new_tokens=6, eos_token_id=[]))
    with pytest.raises(ConfigError, match="num_beams=3 \\(beam search\\) \\(set in the generation_config argument\\)"):
        llama_pair[1].generate(ids, mask, generation_config=GenerationConfig(num_beams=3))


def test_num_return_sequences_grouping(llama_pair):
    """Row i's copies are adjacent (transformers' repeat_interleave); top_k=1 makes each copy its row's greedy
    continuation, and with real sampling the copies differ."""
    _, ours = llama_pair
    ids, mask = _left_padded_batch()
    greedy = generate(ours, ids, mask, max_new_tokens=5, eos_token_id=[])
    out = ours.generate(ids, mask, do_sample=True, top_k=1, num_return_sequences=3, max_new_tokens=5,
                        eos_token_id=[], seed=0)
    assert out.shape == (9, 12) and torch.equal(out, greedy.repeat_interleave(3, dim=0))
    out = ours.generate(ids, mask, do_sample=True, temperature=3.0, top_k=0, num_return_sequences=4,
                        max_new_tokens=8, eos_token_id=[], seed=0)
    assert out.shape == (12, 15) and torch.equal(out[:, :7], ids.repeat_interleave(4, dim=0))
    assert len({tuple(r) for r in out[:4, 7:].tolist()}) > 1
    with pytest.raises(ConfigError, match="num_return_sequences=2 needs do_sample=True"):
        ours.generate(ids, mask, num_return_sequences=2)


def test_sampling_scores_equal_transformers(llama_pair):
    """The processed scores of the first sampled step (output_scores) have transformers' order and formulas:
    the same tokens survive, with the same values (the models agree within 1e-5)."""
    ids, mask = _left_padded_batch()
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3, max_new_tokens=1,
              output_scores=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref, got = _both(llama_pair, ids, mask, **kw)
    assert got.sequences.shape == (3, 8) and len(got.scores) == 1 and len(got.logits) == 1
    assert torch.equal(torch.isfinite(got.scores[0]), torch.isfinite(ref.scores[0]))
    assert torch.isfinite(got.scores[0]).sum(-1).min() > 1  # the filters left a choice
    finite = torch.isfinite(ref.scores[0])
    torch.testing.assert_close(got.scores[0][finite], ref.scores[0][finite], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.logits[0], ref.logits[0], rtol=1e-4, atol=1e-4)


def test_logits_processor_and_stopping_criteria_objects(llama_pair):
    from transformers.generation import (LogitsProcessorList, MaxLengthCriteria, RepetitionPenaltyLogitsProcessor,
                                         StoppingCriteriaList, SuppressTokensLogitsProcessor)

    ids, mask = _left_padded_batch()
    greedy_first = generate(llama_pair[1], ids, mask, max_new_tokens=1)[:, -1].tolist()
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(greedy_first),
                                      RepetitionPenaltyLogitsProcessor(1.5)])  # replaces the built-in 1.1 one
    ref, got = _both(llama_pair, ids, mask, max_new_tokens=6, pad_token_id=0, logits_processor=processors,
                     repetition_penalty=1.1)
    assert torch.equal(got, ref) and not any(t in greedy_first for t in got[:, 7].tolist())
    ref, got = _both(llama_pair, ids, mask, max_new_tokens=6, pad_token_id=0,
                     stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(10)]))
    assert got.shape[1] == 10 and torch.equal(got, ref)


def test_prompt_spellings_and_streamer(llama_pair):
    _, ours = llama_pair
    ids, mask = _left_padded_batch()
    ref = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=4), ref)
    assert torch.equal(ours.generate(inputs=ids, attention_mask=mask, max_new_tokens=4, token_type_ids=ids * 0), ref)
    puts = []
    streamer = type("S", (), {"put": lambda self, x: puts.append(x), "end": lambda self: puts.append("end")})()
    out = ours.generate(ids[:1], max_new_tokens=3, eos_token_id=[], streamer=streamer)
    assert torch.equal(puts[0], ids[:1]) and [int(p) for p in puts[1:-1]] == out[0, 7:].tolist()
    assert puts[-1] == "end"
    with pytest.raises(ConfigError, match="given twice"):
        ours.generate(ids, inputs=ids)


@pytest.mark.parametrize("fast", [True, False])
def test_tokenizer_output_as_the_prompt(llama_pair, tiny_model_dir, fast):
    """transformers 5's apply_chat_template(..., return_tensors="pt") returns a BatchEncoding, which scripts written
    for transformers 4 pass as input_ids: its ids and attention mask are used, on both model kinds."""
    import warnings

    from transformers import BatchEncoding

    from fasttune import FastLanguageModel

    if fast:
        model = llama_pair[1]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), fast=False)
    ids, mask = _left_padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    batch = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(model.generate(input_ids=batch, max_new_tokens=4), ref)
    assert torch.equal(model.generate(batch, max_new_tokens=4), ref)
    alone = model.generate(input_ids=ids[:1], max_new_tokens=4)  # a row without padding, no mask in the dict
    assert torch.equal(model.generate(inputs={"input_ids": ids[:1]}, max_new_tokens=4), alone)
    with pytest.raises(ConfigError, match="attention mask was given twice"):
        model.generate(input_ids=batch, attention_mask=mask)
    with pytest.raises(ConfigError, match="without 'input_ids' \\(keys: attention_mask\\)"):
        model.generate(input_ids={"attention_mask": mask})


@pytest.mark.parametrize("kw, match", [
    (dict(num_beams=2), "num_beams=2 \\(beam search\\).*Leave num_beams out \\(or set it to 1\\)"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha=0.6 \\(contrastive search\\)"),
    (dict(prefix_allowed_tokens_fn=lambda b, ids: [1]), "prefix_allowed_tokens_fn=function"),
    (dict(no_repeat_ngram_size=3), "no_repeat_ngram_size=3"),
    (dict(temprature=1.5), "unknown argument 'temprature'. Did you mean 'temperature'\\?"),
    (dict(max_new_token=5), "Did you mean 'max_new_tokens'"),
    (dict(min_p=1.5), "min_p=1.5 is invalid"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is invalid"),
    (dict(generation_config={"max_new_tokens": 3}), "must be a transformers GenerationConfig"),
])
def test_unsupported_and_unknown_arguments(kw, match, llama_pair):
    ids, _ = _left_padded_batch()
    with pytest.raises(ConfigError, match=match):
        llama_pair[1].generate(ids, **kw)


def test_generate_text_with_chat_template(tmp_path, tiny_tokenizer):
    _, ours = _pair("llama", tmp_path)
    text = generate_text(ours, tiny_tokenizer, "hi", max_new_tokens=5)
    assert isinstance(text, str)
    assert generate_text(ours, tiny_tokenizer, "hi", max_new_tokens=5, temperature=0.8, seed=1) == \
        generate_text(ours, tiny_tokenizer, "hi", max_new_tokens=5, temperature=0.8, seed=1)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2_dir):
    """The real model, chat prompts of different lengths in one left-padded batch, 24 new tokens. transformers
    runs the same weights (tests/models/test_smollm2_real.py shows they are the ones it reads from the GGUF)."""
    from transformers import AutoModelForCausalLM

    from fasttune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(smollm2_dir))  # the GGUF's weights, loaded once per session
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
