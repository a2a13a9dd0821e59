"""Int8 storage against bitsandbytes' LLM.int8 row-wise layout."""
import pytest
import torch

from fasttune.errors import ModelLoadError
from fasttune.quant.int8 import dequantize_int8, quantize_int8, state_from_tensors, state_to_tensors

F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("shape", [(5, 8), (64, 123), (300, 64)])
def test_codes_and_scales_equal_bitsandbytes(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    codes, scb, _ = F.int8_vectorwise_quant(w.clone())
    ours = quantize_int8(w)
    assert torch.equal(ours.weight, codes) and torch.equal(ours.scb, scb)
    err = (dequantize_int8(ours, torch.float32) - w).abs().max(dim=1).values
    assert (err <= scb / 127 / 2 + 1e-6).all()  # at most half a step per row


def test_zero_row_and_serialisation():
    w = torch.randn(4, 16)
    w[2] = 0
    st = quantize_int8(w)
    assert (st.weight[2] == 0).all() and torch.isfinite(dequantize_int8(st)).all()
    t = state_to_tensors(st, "m.")
    assert set(t) == {"m.weight", "m.SCB", "m.weight_format"}
    back = state_from_tensors(t["m.weight"], t["m.SCB"], torch.float32, "x", t["m.weight_format"])
    assert torch.equal(dequantize_int8(back), dequantize_int8(st))
    with pytest.raises(ModelLoadError, match="weight_format"):
        state_from_tensors(t["m.weight"], t["m.SCB"], torch.float32, "x", torch.tensor(1))
    with pytest.raises(ModelLoadError, match="int8"):
        state_from_tensors(t["m.weight"].float(), t["m.SCB"], torch.float32, "x")
