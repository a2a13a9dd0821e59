"""OLMo 2 / OLMo 3 (and EXAONE 4, which shares their post-norm layers): norms after attention and MLP only, q/k norms
over the whole projection for OLMo (tiny configs)."""
import pytest
import torch
from tiny import hf_model, save_hf

from fasttune.models.loading import load_model


@pytest.mark.parametrize("family", ["olmo2", "olmo3"])
def test_layout_and_biased_variant_equal_transformers(family, tmp_path):
    """The layer holds transformers' parameter names and shapes (no input_layernorm, q/k norms of the projection
    width), and attention_bias=True still gives transformers' logits."""
    hf = hf_model(family, attention_bias=True)
    ours, _ = load_model(save_hf(hf, tmp_path / "m"), torch.float32, "cpu")
    theirs = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == theirs
    assert theirs["model.layers.0.self_attn.k_norm.weight"] == (2 * 16,)  # 2 kv heads x head_dim 16
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern,expected", [(4, [3, 3, 3, None, 3, 3]), ("LLG", [3, 3, None, 3, 3, None])])
def test_exaone4_config_without_layer_types_reads_its_pattern(pattern, expected):
    """EXAONE 4 shares OLMo 2's post-norm layers; a config.json without layer_types takes Exaone4Config's pattern
    (a period, or letters L/G), and only its sliding layers rotate."""
    from fasttune.models.config import ModelConfig

    cfg = {"model_type": "exaone4", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "sliding_window": 3, "sliding_window_pattern": pattern}
    arch = ModelConfig.from_hf(cfg)
    assert arch.sliding_windows == expected and arch.post_norm and arch.qk_norm and not arch.qk_norm_full
    assert arch.rope_layers == [w is not None for w in expected]
