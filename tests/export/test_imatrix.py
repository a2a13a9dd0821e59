"""Importance-matrix (imatrix) k-quants (issue #19): the weighted quantizers of export/kquants.py against ggml's own
`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` from llama-cpp-python's bundled libggml-base,
byte for byte; the collection (export/imatrix.py) on a tiny model; the GGUF plumbing and its errors."""
import ctypes
import os

import numpy as np
import pytest
import torch

from fasttune.export import kquants

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

WEIGHTED = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def ggml():
    """ggml_quantize_chunk(name, x (rows, n_per_row) float32, imatrix (n_per_row,) float32 or None) -> bytes."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(x: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        block, size = kquants.BLOCKS[name]
        out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        n = lib.ggml_quantize_chunk(int(gguf.GGMLQuantizationType[name]), x.ctypes.data, out.ctypes.data, 0,
                                    x.shape[0], x.shape[1], None if qw is None else qw.ctypes.data)
        assert n == out.size
        return out

    return quantize


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    shape = (8, 512)
    special = torch.zeros(8, 512)
    special[1] = 0.3  # constant block
    special[2] = -u(512)  # negative only
    special[3] = 1e-30 * r(512)  # tiny
    special[4] = r(512) * 1e15  # huge: x^2 overflows, the weights are inf
    special[5] = torch.where(u(512) < 0.05, r(512), torch.zeros(512))  # mostly zeros
    special[6, ::2] = 1.0  # ties
    special[7] = -0.0  # signed zeros (ggml keeps -0.0 as the block minimum)
    xs = {"normal": r(*shape) * 0.02, "student_t": torch.distributions.StudentT(3.0).sample(shape) * 0.01,
          "grid": torch.randint(-8, 8, shape, generator=g).float() * 0.125, "positive": u(*shape) + 1,
          "special": special}
    ws = {"uniform": u(512) + 0.01, "lognormal": torch.exp(3 * r(512)),  # activations' mean squares vary a lot
          "sparse": torch.where(u(512) < 0.3, u(512), torch.zeros(512)), "zeros": torch.zeros(512),
          "huge": u(512) * 1e30}
    return xs, ws


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_weighted_quantizer_bytes_equal_ggml(qtype, ggml):
    """Every block byte-identical to ggml_quantize_chunk with an imatrix (quantize_row_<type>_impl), for each
    input against each kind of random non-negative importance, and different from the unweighted bytes."""
    size = kquants.BLOCKS[qtype][1]
    xs, ws = _inputs()
    x = torch.cat(list(xs.values()))  # one call per importance vector; rows name their input on failure
    names = [name for name, v in xs.items() for _ in range(len(v))]
    for wname, qw in ws.items():
        ours = kquants.quantize(x, qtype, qw).reshape(len(x), -1, size)
        theirs = ggml(x.numpy(), qtype, qw.numpy()).reshape(len(x), -1, size)
        same = (ours == theirs).all(2)
        bad = sorted({names[r] for r in np.nonzero(~same.all(1))[0]})
        assert same.all(), f"{qtype} with {wname} importance: {int((~same).sum())} blocks differ in inputs {bad}"
    assert (kquants.quantize(xs["normal"], qtype, ws["lognormal"]) != kquants.quantize(xs["normal"], qtype)).any()


def test_q8_0_ignores_the_imatrix_as_ggml_does(ggml):
    x, qw = torch.randn(4, 256), torch.rand(256)
    assert np.array_equal(kquants.quantize(x, "Q8_0", qw), ggml(x.numpy(), "Q8_0", qw.numpy()))
    assert np.array_equal(kquants.quantize(x, "Q8_0", qw), kquants.quantize(x, "Q8_0"))


def test_weighted_quantize_bad_imatrix():
    x = torch.randn(4, 512)
    with pytest.raises(ValueError, match="needs 512 values"):
        kquants.quantize(x, "Q4_K", torch.rand(256))
    with pytest.raises(ValueError, match="negative or non-finite"):
        kquants.quantize(x, "Q4_0", torch.full((512,), float("nan")))
    with pytest.raises(ValueError, match="negative or non-finite"):
        kquants.quantize(x, "Q6_K", -torch.rand(512))
