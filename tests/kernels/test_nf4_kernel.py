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
    # Same fp32 products, one rounding; an FMA in the absmax may move the last bit of fp32.
    torch.testing.assert_close(ours, ref, rtol=1e-6 if dtype == torch.float32 else 0, atol=0)
