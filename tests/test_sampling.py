"""Logits processors: each filter equals transformers' processor exactly (torch.equal) on random logits."""
import pytest
import torch
from transformers.generation import logits_process as lp

from fasttune import sampling


def _scores(seed=0, shape=(4, 300), scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _ids(seed=1, shape=(4, 12), vocab=300):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 5, 50, 299, 300, 1000])
def test_top_k_equals_transformers(k):
    scores = _scores()
    scores[0, :10] = 2.5  # ties at the boundary stay, as in transformers
    assert torch.equal(sampling.top_k(scores, k), lp.TopKLogitsWarper(k)(_ids(), scores))


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.99])
def test_top_p_equals_transformers(p):
    scores = _scores(seed=2)
    assert torch.equal(sampling.top_p(scores, p), lp.TopPLogitsWarper(p)(_ids(), scores))


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_equals_transformers(p):
    scores = _scores(seed=3)
    assert torch.equal(sampling.min_p(scores, p), lp.MinPLogitsWarper(p)(_ids(), scores))


@pytest.mark.parametrize("t", [0.3, 1.5])
def test_temperature_equals_transformers(t):
    scores = _scores(seed=4)
    assert torch.equal(sampling.temperature(scores, t), lp.TemperatureLogitsWarper(t)(_ids(), scores))


def test_warp_chain_equals_transformers_order():
    """temperature -> top-k -> top-p -> min-p, as transformers' _get_logits_processor appends the warpers."""
    scores = _scores(seed=5)
    chain = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(40),
                                    lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)])
    assert torch.equal(sampling.warp(scores, 0.7, 40, 0.9, 0.05), chain(_ids(), scores))
    assert torch.equal(sampling.warp(scores, 1.0, 0, 1.0, None), scores)  # every filter off


@pytest.mark.parametrize("penalty", [0.8, 1.3])
def test_repetition_penalty_equals_transformers(penalty):
    """Over prompt + generated ids, leading padding ignored per row (transformers' prompt_ignore_length); ids
    repeat within rows; a row of ids beyond the vocabulary (a padded embedding) is ignored, as there."""
    from fasttune.generate import _seen_tokens

    scores = _scores(seed=6)
    ids = _ids(shape=(4, 12), vocab=40)  # few distinct ids: many repeats
    ids[3, -2:] = 305
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :11] = 0
    seen = _seen_tokens(ids, mask, scores.shape[-1])[:, :-1]
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=(mask != 0).int().argmax(dim=1))
    assert torch.equal(sampling.repetition_penalty(scores, seen, penalty), ref(ids, scores.clone()))


def test_suppress_equals_min_new_tokens_processor():
    scores = _scores(seed=7)
    eos = torch.tensor([3, 17])
    ref = lp.MinNewTokensLengthLogitsProcessor(5, 2, eos)(_ids(shape=(4, 6)), scores)  # 1 new token < 2
    assert torch.equal(sampling.suppress(scores, eos), ref)


def test_next_tokens_greedy_and_sampled():
    scores = sampling.top_k(_scores(seed=8), 3)
    assert torch.equal(sampling.next_tokens(scores, False), scores.argmax(-1))
    g = torch.Generator().manual_seed(0)
    allowed = torch.isfinite(scores)
    for _ in range(20):
        picks = sampling.next_tokens(scores, True, g)
        assert allowed.gather(1, picks[:, None]).all()
