"""Our decoder against transformers on tiny random configs of every family (fp32, CPU)."""
import pytest
import torch
from tiny import FAMILIES, hf_model

from fasttune.models.loading import load_model


def _max_rel_err(a, b, valid):
    return ((a - b).abs()[valid].max() / a[valid].abs().max()).item()


def _compare(folder, hf, padded: bool | str, position_ids=None):
    ours, _ = load_model(folder, torch.float32, "cpu")
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 11))
    mask = torch.ones_like(ids)
    if padded == "left":  # keeps the mask (right padding runs as plain causal attention)
        mask[1, :5] = 0
        mask[2, :2] = 0
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    elif padded:
        mask[1, 6:] = 0
        mask[2, 9:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask, position_ids=position_ids).logits
    return _max_rel_err(ref, got, mask.bool())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True, "left"])
def test_logits_equal_transformers(family, padded, tiny_model_dir):
    folder = tiny_model_dir(family)
    hf = hf_model(family)
    assert _compare(folder, hf, padded) < 1e-5


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    # yarn also scales cos/sin (its attention factor, 0.1 ln 4 + 1 here)
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
])
def test_rope_scaling_equal_transformers(scaling, tmp_path):
    from tiny import save_hf

    params = {"rope_theta": 10000.0, **scaling}
    hf = hf_model("llama", rope_parameters=params, rope_scaling=params)
    folder = save_hf(hf, tmp_path / "m")
    hf = hf_model("llama", rope_parameters=params, rope_scaling=params)
    positions = torch.arange(11).expand(3, 11) * 7  # long positions exercise the scaled frequencies
    assert load_model(folder, torch.float32, "cpu")[0].arch.rope_scaling["rope_type"] == scaling["rope_type"]
    assert _compare(folder, hf, padded=False, position_ids=positions) < 1e-5


def test_sliding_window_mistral_equal_transformers(tmp_path):
    from tiny import save_hf

    hf = hf_model("mistral", sliding_window=3)
    folder = save_hf(hf, tmp_path / "m")
    assert _compare(folder, hf, padded=True) < 1e-5


def test_partial_rotary_phi3_equal_transformers(tmp_path):
    from tiny import save_hf

    params = {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}
    hf = hf_model("phi3", rope_parameters=params, partial_rotary_factor=0.5)
    folder = save_hf(hf, tmp_path / "m")
    assert load_model(folder, torch.float32, "cpu")[0].arch.rotary_dim == 8
    assert _compare(folder, hf, padded=False) < 1e-5


def test_loss_matches_transformers(tiny_model_dir):
    folder = tiny_model_dir("gemma2")
    hf = hf_model("gemma2")
    ours, _ = load_model(folder, torch.float32, "cpu")
    ids = torch.randint(3, 300, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels).loss
        got = ours(ids, labels=labels).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_forward_runs(tiny_model_dir):
    ours, _ = load_model(tiny_model_dir("llama"), torch.bfloat16, "cpu")
    out = ours(torch.randint(3, 300, (1, 5)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_right_padding_is_detected():
    from fasttune.models.masks import right_padded

    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole
    assert right_padded(torch.tensor([[1]])) and not right_padded(torch.tensor([[0]]))


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gemma3_text"])
def test_inputs_embeds_equal_transformers(family, tiny_model_dir):
    """Embeddings passed in are used as given: Gemma's scaling lives in its embedding module, which they skip."""
    ours, _ = load_model(tiny_model_dir(family), torch.float32, "cpu")
    hf = hf_model(family)
    embeds = torch.randn(2, 7, hf.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds).logits
        got = ours(inputs_embeds=embeds).logits
    assert _max_rel_err(ref, got, torch.ones(2, 7, dtype=torch.bool)) < 1e-5
