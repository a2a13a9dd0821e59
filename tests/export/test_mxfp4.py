"""GGML's MXFP4 (export/mxfp4.py) against ggml itself, through llama-cpp-python's bundled libggml-base:
ggml_quantize_chunk(GGML_TYPE_MXFP4) for the bytes, dequantize_row_mxfp4 for the values."""

import numpy as np
import pytest
import torch
from llama_cpp_check import ggml_lib, ggml_quantize

from fasttune.export import kquants, mxfp4

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def ggml():
    return ggml_lib()


def _near_powers_of_two() -> torch.Tensor:
    """One value per block, each at or a few ulps around 2^k for every float32 exponent (subnormals included):
    where floorf(log2f(amax)) decides the scale byte, and below 2^-125 where ggml's byte wraps around."""
    vals = []
    for k in range(-149, 128):
        p = np.float32(2.0) ** np.float32(k)
        down = up = p
        vals.append(p)
        for _ in range(4):
            down = np.nextafter(down, np.float32(0))
            up = np.nextafter(up, np.float32(np.inf))
            vals += [down, up]
    vals = torch.tensor(np.array([v for v in vals if np.isfinite(v)], np.float32))
    x = torch.zeros(len(vals), 32)
    x[torch.arange(len(vals)), torch.arange(len(vals)) % 32] = vals * torch.where(torch.arange(len(vals)) % 3 == 0,
                                                                                -1.0, 1.0)
    x[:, (torch.arange(len(vals)) + 7) % 32] = vals / 3  # a second value rounding between levels
    return x


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    shape = (32, 512)
    special = torch.zeros(10, 512)
    special[1] = 0.3
    special[2] = -u(512)
    special[3] = r(512) * 1e-39  # subnormal amax: ggml's scale byte wraps around
    special[4] = r(512) * 1e37
    special[5] = torch.where(u(512) < 0.05, r(512), torch.zeros(512))
    special[6] = -0.0
    special[7, ::3] = float("nan")  # NaN is not a maximum and maps to index 0
    special[7, 1::3] = r(171)[:len(range(1, 512, 3))]
    special[8, ::64] = float("inf")
    special[8, 1::64] = -float("inf")
    special[9] = 3.4e38 * torch.sign(r(512))  # kvalues * d - x overflows
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 1.25, 1.75, 2.5, 3.5, 5, 0.25, 0.75, 2.25])  # exact ties too
    return {
        "normal": r(*shape) * 0.02,
        "student_t": torch.distributions.StudentT(3.0).sample(shape) * 0.01,
        "bf16_weights": (r(*shape) * 0.05).bfloat16().float(),
        "outliers": r(*shape) * 0.02 * (1 + 50 * (u(*shape) < 0.002)),
        "levels_and_midpoints": grid[torch.randint(0, 16, shape, generator=g)] * torch.sign(r(*shape))
                                * 2.0 ** torch.randint(-20, 20, (shape[0], 1), generator=g).float(),
        "special": special,
        "near_powers_of_two": _near_powers_of_two(),
    }


def test_quantizer_bytes_equal_ggml(ggml):
    """Every block byte-identical to ggml_quantize_chunk(GGML_TYPE_MXFP4) (quantize_row_mxfp4_ref)."""
    for name, x in _cases().items():
        ours = kquants.quantize(x, "MXFP4").reshape(-1, 17)
        theirs = ggml_quantize(ggml, x.numpy(), "MXFP4").reshape(-1, 17)
        same = (ours == theirs).all(1)
        assert same.all(), f"{name}: {int((~same).sum())} of {len(same)} blocks differ"
        assert len(same) == x.numel() // 32


def test_dequantizer_equals_ggml(ggml):
    """dequantize_mxfp4 gives dequantize_row_mxfp4's float32 values bit for bit, on our blocks and on random bytes
    (every scale byte and nibble)."""
    g = torch.Generator().manual_seed(1)
    random_bytes = torch.randint(0, 256, (256 * 17,), generator=g, dtype=torch.uint8).numpy()
    random_bytes[::17] = np.arange(256)
    for data, cols in ((random_bytes, 256), (kquants.quantize(_cases()["normal"], "MXFP4"), 512)):
        data = np.ascontiguousarray(data, np.uint8)
        theirs = np.zeros(data.size // 17 * 32, np.float32)
        ggml.dequantize_row_mxfp4(data.ctypes.data, theirs.ctypes.data, theirs.size)
        ours = mxfp4.dequantize_mxfp4(data, cols)
        assert ours.shape == (theirs.size // cols, cols)
        np.testing.assert_array_equal(ours.numpy().view(np.int32).reshape(-1), theirs.view(np.int32))


def test_representable_values_round_trip_and_errors():
    """Values on the MXFP4 grid of their block come back exactly; shapes; rows not divisible by 32 are refused."""
    x = _cases()["levels_and_midpoints"]
    on_grid = torch.where(torch.isin(x.abs() / x.abs().amax(1, keepdim=True) * 6,
                                     torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6.])), x, torch.zeros(()))
    data = kquants.quantize(on_grid.reshape(4, 8, 512), "MXFP4")
    assert data.shape == (32, 16 * 17) and data.dtype == np.uint8
    torch.testing.assert_close(mxfp4.dequantize_mxfp4(data, 512), on_grid, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        kquants.quantize(torch.randn(2, 48), "MXFP4")
    with pytest.raises(ValueError, match="whole rows"):
        mxfp4.dequantize_mxfp4(np.zeros(20, np.uint8), 32)
