"""NF4 storage against bitsandbytes (the layout we promise to read and write)."""
import pytest
import torch

from fasttune.quant.nf4 import (NF4State, dequantize_nf4_reference, dynamic_map, nf4_levels, quantize_nf4,
                                state_from_tensors, state_to_tensors)

F = pytest.importorskip("bitsandbytes.functional")
SHAPES = [(64, 128), (123, 77), (300, 64), (5, 7), (1000, 130)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.3  # an outlier makes one block's absmax stand out
    return w.to(dtype)


def _from_bnb(packed, qs) -> NF4State:
    st = NF4State(packed.view(-1), qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize, code=qs.code)
    if qs.nested:
        st.nested_absmax, st.nested_code, st.offset = qs.state2.absmax, qs.state2.code, float(qs.offset)
    return st


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(nf4_levels(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_4bit_codes_and_absmax_bit_for_bit(shape, dtype):
    w = _weight(shape, dtype)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))  # incl. the spare nibble of an odd count
    assert torch.equal(ours.absmax, qs.absmax)
    assert torch.equal(dequantize_nf4_reference(ours), F.dequantize_4bit(packed, qs))


# (5, 7) is one block: absmax - offset is 0, which bitsandbytes' CPU library divides by 0 (0/0).
@pytest.mark.parametrize("shape", [s for s in SHAPES if s != (5, 7)])
def test_double_quantisation_matches_bitsandbytes(shape):
    w = _weight(shape, torch.bfloat16, seed=1)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1))
    assert ours.offset == float(qs.offset)
    assert torch.equal(ours.nested_absmax, qs.state2.absmax)
    # The 8-bit codes of the absmax equal bitsandbytes' except at near-ties, where its CPU library's binary search
    # is approximate: there ours is the nearer level, never the farther.
    diff = (ours.absmax != qs.absmax).nonzero().flatten()
    assert diff.numel() <= max(1, qs.absmax.numel() // 100)
    am = _block_absmax_fp32(w) - ours.offset
    x = (am / ours.nested_absmax.repeat_interleave(256)[:am.numel()])[diff]
    code = dynamic_map()
    assert ((x - code[ours.absmax[diff].long()]).abs() <= (x - code[qs.absmax[diff].long()]).abs()).all()
    # Given the same stored state, dequantisation is bitsandbytes', bit for bit.
    assert torch.equal(dequantize_nf4_reference(_from_bnb(packed, qs)), F.dequantize_4bit(packed, qs))


def _block_absmax_fp32(w):
    flat = w.float().reshape(-1)
    n = flat.numel() - flat.numel() % 64
    am = flat[:n].view(-1, 64).abs().amax(1)
    return torch.cat([am, flat[n:].abs().amax().view(1)]) if n < flat.numel() else am


def test_state_serialises_as_bitsandbytes_keys_and_round_trips():
    w = _weight((96, 64), torch.bfloat16)
    ours = quantize_nf4(w)
    key = "model.layers.0.mlp.down_proj.weight"
    tensors = state_to_tensors(ours, key)
    assert set(tensors) == {key, f"{key}.absmax", f"{key}.quant_map", f"{key}.nested_absmax",
                            f"{key}.nested_quant_map", f"{key}.quant_state.bitsandbytes__nf4"}
    # bitsandbytes reads what we write ...
    qs = F.QuantState.from_dict({k.removeprefix(key + "."): v for k, v in tensors.items() if k != key}, "cpu")
    assert torch.equal(F.dequantize_4bit(tensors[key], qs), dequantize_nf4_reference(ours))
    # ... and we read it back.
    parts = {("" if k == key else k.removeprefix(key + ".")): v for k, v in tensors.items()}
    back = state_from_tensors(parts, "test")
    assert torch.equal(dequantize_nf4_reference(back), dequantize_nf4_reference(ours))
    assert back.shape == (96, 64) and back.dtype == torch.bfloat16


def test_missing_piece_and_fp4_are_clear_errors():
    from fasttune.errors import ModelLoadError

    ours = quantize_nf4(_weight((64, 64), torch.float32))
    parts = {("" if k == "w" else k.removeprefix("w.")): v for k, v in state_to_tensors(ours, "w").items()}
    del parts["nested_absmax"]
    with pytest.raises(ModelLoadError, match="nested_absmax"):
        state_from_tensors(parts, "ckpt")
    parts = {"": ours.packed, "quant_state.bitsandbytes__fp4": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(ModelLoadError, match="fp4"):
        state_from_tensors(parts, "ckpt")
