"""OLMo 2 / OLMo 3: norms after attention and MLP only, and q/k norms over the whole projection (tiny configs)."""
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
