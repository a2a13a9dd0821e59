"""QuantLinear: the matmul and its input gradient equal a plain Linear on the dequantised weight."""
import pytest
import torch
import torch.nn as nn

from fasttune.quant.linear import QuantLinear


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_forward_and_input_grad_equal_dequantised_linear(quant):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = QuantLinear.from_linear(lin, quant)
    w = q.dequantized_weight(torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = q(x)
    y2 = torch.nn.functional.linear(x2, w, lin.bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


def test_to_dtype_moves_but_never_casts_storage():
    q = QuantLinear.from_linear(nn.Linear(64, 64, bias=False), "nf4")
    before = {n: (b.dtype, b.clone()) for n, b in q.named_buffers()}
    q.to(torch.bfloat16)
    for n, b in q.named_buffers():
        assert b.dtype == before[n][0] and torch.equal(b, before[n][1])
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_state_dict_uses_bitsandbytes_names():
    q = QuantLinear.from_linear(nn.Linear(64, 32, bias=True), "nf4")
    keys = set(q.state_dict())
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "bias"} == keys
    q8 = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), "int8")
    assert set(q8.state_dict()) == {"weight", "SCB", "weight_format"}
    big = QuantLinear.from_linear(nn.Linear(1024, 1024, bias=False), "nf4")
    assert big.nbytes() * 8 / 1024**2 < 4.2  # bits per weight: 4 + the double-quantised absmax
