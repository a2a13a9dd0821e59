"""SmolLM3: Llama's decoder with no RoPE in some layers (no_rope_layers), against transformers on tiny configs."""
import pytest
import torch
from tiny import hf_config, hf_model, save_hf

from fasttune.errors import ModelLoadError
from fasttune.models.config import ModelConfig
from fasttune.models.loading import load_model


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _batch():
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the masked attention path
    return ids, mask


@pytest.mark.parametrize("given,expected", [
    ({}, [True, True, True, False]),  # transformers' default: every 4th layer has no RoPE
    ({"no_rope_layer_interval": 2}, [True, False, True, False]),
    ({"no_rope_layers": [0, 1, 1, 0, 1]}, [False, True, True, False]),  # longer than the layers: the first ones
])
def test_rope_layers_read_as_transformers_reads_them(given, expected):
    cfg = hf_config("smollm3", **given)
    if "no_rope_layers" not in given:
        cfg.no_rope_layers = None  # as a config.json written before the list was stored
    assert ModelConfig.from_hf(cfg).rope_layers == expected
    assert ModelConfig.from_hf(hf_config("llama")).rope_layers == []


@pytest.mark.parametrize("bad", [[1, 1, 0], [1, 2, 1, 0]])
def test_bad_no_rope_layers_name_the_field(bad):
    with pytest.raises(ModelLoadError, match="no_rope_layers .* 0 or 1 for each of the 4 layers"):
        ModelConfig.from_hf(hf_config("smollm3", no_rope_layers=bad))


def test_nope_layers_skip_rope_exactly_where_transformers_does(tmp_path):
    """Equal to transformers with the NoPE layers; a model rotating in every layer gives other logits (so the
    equality is not blind to the layer pattern)."""
    ids, mask = _batch()
    hf = hf_model("smollm3", no_rope_layers=[1, 0, 1, 0])
    ours, _ = load_model(save_hf(hf, tmp_path / "m"), torch.float32, "cpu")
    assert [layer.self_attn.rope_kind for layer in ours.model.layers] == ["global", "none", "global", "none"]
    got = _logits(ours, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], _logits(hf, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    everywhere = _logits(hf_model("smollm3", no_rope_layers=[1, 1, 1, 1]), ids, mask)
    assert (everywhere[valid] - got[valid]).abs().max() > 1e-3


def test_sliding_window_on_nope_layers_equals_transformers(tmp_path):
    """use_sliding_window: transformers' SmolLM3Config makes the NoPE layers slide; a window of 3 is shorter than
    the rows, so a wrong window changes the logits."""
    hf = hf_model("smollm3", use_sliding_window=True, sliding_window=3,
                  layer_types=["full_attention", "full_attention", "full_attention", "sliding_attention"])
    ours, _ = load_model(save_hf(hf, tmp_path / "m"), torch.float32, "cpu")
    assert ours.arch.sliding_windows == [None, None, None, 3]
    ids, mask = _batch()
    valid = mask.bool()
    torch.testing.assert_close(_logits(ours, ids, mask)[valid], _logits(hf, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    hf.config.use_sliding_window = False
    off = ModelConfig.from_hf(hf.config)
    assert off.sliding_windows == [None] * 4  # transformers' attention ignores layer_types without the switch
