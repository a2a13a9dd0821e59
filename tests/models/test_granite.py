"""Granite: Llama's decoder with four multipliers (embeddings, residual branches, attention scores, logits)."""
import torch
from tiny import hf_model, save_hf

from fasttune.models.loading import load_model


def _pair(tmp_path):
    hf = hf_model("granite")
    ours, _ = load_model(save_hf(hf, tmp_path / "m"), torch.float32, "cpu")
    return hf, ours


def test_multipliers_read_from_the_config(tmp_path):
    _, ours = _pair(tmp_path)
    a = ours.arch
    assert (a.embedding_multiplier, a.residual_multiplier, a.scaling, a.logits_scaling) == (12.0, 0.22, 0.0078125, 8.0)


def test_given_embeddings_and_every_head_path_equal_transformers(tmp_path):
    """inputs_embeds are multiplied too (as GraniteModel does), and the logits division reaches the fused loss,
    the per-token log-probs (preference objectives) and the logits alike."""
    hf, ours = _pair(tmp_path)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        embeds = hf.get_input_embeddings()(ids)
        torch.testing.assert_close(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
        loss = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, want.shape[-1]), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(ours(ids, labels=ids, return_logits=False).loss, loss, rtol=1e-5, atol=1e-6)
        hidden = ours.model(ids).last_hidden_state
        logprobs = ours.token_logprobs(hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1))
        ref = want[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).reshape(-1)
        torch.testing.assert_close(logprobs, ref, rtol=1e-5, atol=1e-5)
