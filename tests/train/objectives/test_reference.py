"""model_token_logprobs, the one per-token log-prob function of the objectives: equal to log_softmax + gather of
the model's own logits, on our decoder (chunked lm_head) and the transformers fallback, for every token after the
first (DPO/ORPO/KTO) and for the last n of left-padded rows at a temperature (GRPO)."""
import pytest
import torch
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.train.objectives.reference import model_token_logprobs, score_positions


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("reference") / "llama"
    save_hf(hf_model("llama", seed=0), folder, tiny_tokenizer)
    return folder


def _plain(model, ids, mask, position_ids, temperature):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, return_logits=True).logits
    logps = (logits[:, :-1].float() / temperature).log_softmax(-1)
    return logps.gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("fast", [True, False])
def test_every_token_after_the_first(tiny_dir, fast):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32", fast=fast)
    ids = torch.randint(1, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    score = mask.clone()
    score[:, :3] = 0  # a prompt of 3 tokens is not scored
    got = model_token_logprobs(model, ids, mask, score)
    want = _plain(model, ids, mask, None, 1.0).masked_fill(~score[:, 1:].bool(), 0.0)
    assert got.shape == (2, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with_positions = model_token_logprobs(model, ids, mask, score, score_positions(score[:, 1:]))
    torch.testing.assert_close(with_positions, got)


@pytest.mark.parametrize("fast", [True, False])
def test_last_n_of_left_padded_rows_at_a_temperature(tiny_dir, fast):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32", fast=fast)
    ids = torch.randint(1, 250, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the prompt
    mask[1, -1] = 0  # a completion that ended early
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model_token_logprobs(model, ids, mask, mask, score_positions(mask[:, -3:]), last=3,
                               position_ids=position_ids, temperature=0.7)
    want = _plain(model, ids, mask, position_ids, 0.7)[:, -3:].masked_fill(~mask[:, -3:].bool(), 0.0)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
