"""Hunyuan dense: per-head q/k norms applied after RoPE (query_/key_layernorm), and NTK-alpha RoPE."""
import pytest
from tiny import hf_config

from fasttune.errors import ModelLoadError
from fasttune.models.config import ModelConfig


def test_ntk_alpha_is_a_larger_base_and_plain_dynamic_is_refused():
    """alpha stretches the base once, theta * alpha ** (d / (d - 2)), as transformers' Hunyuan computes it; the
    length-dependent "dynamic" RoPE without alpha is not supported."""
    arch = ModelConfig.from_hf(hf_config("hunyuan_v1_dense"))
    assert arch.rope_scaling is None and arch.rope_theta == pytest.approx(10000.0 * 1000.0 ** (16 / 14))
    assert arch.qk_norm and arch.qk_norm_after_rope and not arch.qk_norm_full
    plain = hf_config("hunyuan_v1_dense", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                           "factor": 2.0})
    with pytest.raises(ModelLoadError, match="'dynamic' is not supported"):
        ModelConfig.from_hf(plain)
