"""Ministral 3's text model (the language half of Ministral 3 / Devstral Small 2): Mistral's decoder with yarn RoPE
and Llama 4's query scaling, which multiplies the queries at position p by 1 + beta ln(1 + floor(p / L)), L the
original context length (16 in the tiny config, so short rows cross it). Against transformers' Ministral3ForCausalLM.
The vision-language model (Mistral 3) runs through the shared vision tests (tests/models/test_vision.py)."""
import pytest
import torch
from tiny import hf_config, hf_model, save_hf

from fasttune.generate import generate
from fasttune.models.config import ModelConfig
from fasttune.models.decoder import query_scales
from fasttune.models.loading import load_model

ORIGINAL = 16  # the tiny config's original_max_position_embeddings: scaling starts here


def _tiny(**overrides):
    params = {**hf_config("ministral3").rope_parameters, "original_max_position_embeddings": ORIGINAL,
              "factor": 16.0}
    return hf_model("ministral3", rope_parameters=params, **overrides)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = _tiny()
    ours, _ = load_model(save_hf(hf, tmp_path_factory.mktemp("ministral3") / "m"), torch.float32, "cpu")
    return hf, ours


def test_query_scale_is_read_from_rope_parameters():
    assert ModelConfig.from_hf(hf_config("ministral3")).query_position_scale == (0.1, 8)
    assert ModelConfig.from_hf(hf_config("mistral")).query_position_scale is None
    cfg = ModelConfig.from_hf(_tiny().config)
    scales = query_scales(cfg, torch.tensor([[0, 15, 16, 47, 48]]), torch.float32).flatten()
    # 1 below L, then 1 + 0.1 ln(1 + floor(p / L))
    expected = torch.tensor([1.0, 1.0, 1 + 0.1 * torch.log(torch.tensor(2.0)), 1 + 0.1 * torch.log(torch.tensor(3.0)),
                             1 + 0.1 * torch.log(torch.tensor(4.0))])
    torch.testing.assert_close(scales, expected)


def test_logits_equal_transformers_past_the_original_length(pair):
    """40 positions (scaled from 16 on), one row left-padded; without the scaling the logits differ."""
    hf, ours = pair
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    real = mask.bool()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        ref = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
        scale, ours.arch.query_position_scale = ours.arch.query_position_scale, None
        try:
            unscaled = ours(input_ids=ids, attention_mask=mask).logits
        finally:
            ours.arch.query_position_scale = scale
    assert (unscaled[:, ORIGINAL:] - ref[:, ORIGINAL:]).abs().max() > 1e-4
    torch.testing.assert_close(unscaled[0, :ORIGINAL], ref[0, :ORIGINAL], rtol=1e-5, atol=1e-5)  # 1 below L


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_across_the_original_length_equals_transformers(pair, padded):
    """Prompts of 7 tokens and 20 new ones: the cached decode steps cross position 16 (the scale from the step's
    position, applied before the fused RoPE + attention step where that runs)."""
    hf, ours = pair
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        ids = ids.masked_fill(mask == 0, 0)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=[])
    assert got.shape[1] == 27 and torch.equal(got, ref)
