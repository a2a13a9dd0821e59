"""Triton NF4 dequantisation against the torch reference (CPU: TRITON_INTERPRET=1; bf16 on the GPU)."""
import pytest
import torch
from kernel_check import dtypes_for_device

from fasttune.kernels.dispatch import HAVE_TRITON
from fasttune.kernels.nf4 import dequantize_nf4
from fasttune.quant.nf4 import dequantize_nf4_reference, quantize_nf4

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((123, 77), 64), ((3, 5), 64), ((640, 96), 64),
                                             ((300, 129), 128), ((3, 5), 128), ((70, 40), 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_equals_reference(monkeypatch, shape, blocksize, dtype, double_quant):
    """Shapes whose size is no multiple of the block (a partial last block, an odd count: a half-used last byte),
    several blocks per program and more programs than one, and a block larger than a program's usual tile."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 0.02
    state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    ours, ref = dequantize_nf4(state, dtype), dequantize_nf4_reference(state, dtype)
    assert ours.dtype == dtype and ours.shape == shape
    # Same fp32 products and roundings (no FMA in the nested scale): bit-equal in every dtype.
    assert torch.equal(ours, ref)


@pytest.mark.skipif(DEVICE != "cuda", reason="the compiled kernel's arithmetic; the CPU interpreter never fuses")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_large_weight_bit_equal(monkeypatch, dtype):
    """A projection-sized weight with double quantisation: with a fused multiply-add in the nested scale the
    compiled kernel differed from the reference (and bitsandbytes) in some weights of such a tensor."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 0.02
    state = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(dequantize_nf4(state, dtype), dequantize_nf4_reference(state, dtype))


@pytest.mark.parametrize("per_program,warps", [(1024, 2), (16384, 8)])
def test_launch_tiling_leaves_the_weight_as_it_is(monkeypatch, per_program, warps):
    """Other tilings (the sweep of bench_lora_gemm.py --dequant-sweep) write the same weight, a partial last
    program included."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    w = torch.randn(300, 129, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 0.02
    state = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(dequantize_nf4(state, DTYPES[0], per_program, warps),
                       dequantize_nf4_reference(state, DTYPES[0]))
