"""kernels/lora_decode.py: the two-launch low-rank terms of a LoRA group (decode steps) against their torch
reference: one to three layers of different widths and ranks, ragged row counts and input widths (several K chunks),
scales, biases, and adding onto an existing output (FP8 bases). fp32 on the CPU interpreter and the GPU, bf16 on the
GPU within the unfused path's own rounding."""
import pytest
import torch

from fasttune.kernels import lora_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_kernels(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _group(m, k, layers, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    a_all = torch.randn(sum(r for _, r in layers), k, generator=g) / k ** 0.5
    bs = [torch.randn(n, r, generator=g) for n, r in layers]
    biases = [torch.randn(n, generator=g) for n, _ in layers]
    starts = [torch.randn(m, n, generator=g) for n, _ in layers]
    move = lambda ts: [t.to(DEVICE, dtype) for t in ts]  # noqa: E731
    return x.to(DEVICE, dtype), a_all.to(DEVICE, dtype), move(bs), move(biases), move(starts)


CASES = [  # rows, input width, (output width, rank) per layer, scales
    (1, 300, [(200, 8)], [1.0]),
    (5, 600, [(256, 16), (72, 16), (72, 16)], [2.0, 2.0, 2.0]),  # q/k/v-like: three layers, 3 K chunks
    (33, 130, [(140, 4), (140, 4)], [0.5, 0.5]),  # gate/up-like, ragged everything
    (100, 257, [(50, 16), (129, 8), (16, 32)], [1.0, 3.0, 0.25]),  # two row blocks, mixed ranks
    (3, 200, [(64, 32), (40, 32), (40, 32)], [1.0, 1.0, 1.0]),  # 96 ranks: the 128-wide partials, 64-wide K tiles
]


@pytest.mark.parametrize("m, k, layers, scales", CASES)
@pytest.mark.parametrize("mode", ["plain", "bias", "accumulate"])
def test_kernels_equal_the_reference_in_fp32(m, k, layers, scales, mode, triton_kernels):
    x, a_all, bs, biases, starts = _group(m, k, layers, torch.float32)
    assert lora_decode.fits(x, bs)
    got = [s.clone() for s in starts] if mode == "accumulate" else [torch.empty_like(s) for s in starts]
    want = [s.clone() for s in starts] if mode == "accumulate" else [torch.empty_like(s) for s in starts]
    kw = dict(biases=biases if mode == "bias" else None, accumulate=mode == "accumulate")
    lora_decode.lora_delta(x, a_all, bs, scales, got, **kw)
    lora_decode.lora_delta_reference(x, a_all, bs, scales, want, **kw)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_outside_the_kernels_bounds_the_reference_runs(triton_kernels):
    x, a_all, bs, _, starts = _group(MAXR := lora_decode.MAX_ROWS + 1, 64, [(32, 8)], torch.float32)
    assert x.shape[0] == MAXR and not lora_decode.fits(x, bs)
    x4, a4, bs4, _, _ = _group(2, 64, [(32, 8)] * 4, torch.float32)
    assert not lora_decode.fits(x4, bs4)  # four layers: more than one launch's slots
    xr, _, bsr, _, _ = _group(2, 64, [(32, 48)] * 3, torch.float32)
    assert not lora_decode.fits(xr, bsr)  # 144 ranks in all
    assert not lora_decode.fits(torch.randn(64, 2, device=DEVICE).t(), bs)  # columns not contiguous
    out = [torch.empty_like(starts[0])]
    lora_decode.lora_delta(x, a_all, bs, [2.0], out)
    torch.testing.assert_close(out[0], (x @ a_all.t() * 2.0) @ bs[0].t())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m, k, layers, scales", CASES + [(64, 4096, [(4096, 16), (1024, 16), (1024, 16)], [2.0] * 3),
                                                          (64, 14336, [(4096, 16)], [1.0]),
                                                          # r = 32 on q/k/v: the 128-wide partials at the 8B shape
                                                          (64, 4096, [(4096, 32), (1024, 32), (1024, 32)], [2.0] * 3)])
@pytest.mark.parametrize("mode", ["plain", "bias", "accumulate"])
def test_bf16_within_the_unfused_paths_rounding(m, k, layers, scales, mode, triton_kernels):
    """bf16: x @ A^T's sums run in another order than cuBLAS' split-K, so the rounded xa may differ by one bf16
    step, which the B product carries: bounded by 2^-7 of |xs| |B| summed, per output."""
    x, a_all, bs, biases, starts = _group(m, k, layers, torch.bfloat16)
    got = [s.clone() for s in starts] if mode == "accumulate" else [torch.empty_like(s) for s in starts]
    want = [s.clone() for s in starts] if mode == "accumulate" else [torch.empty_like(s) for s in starts]
    kw = dict(biases=biases if mode == "bias" else None, accumulate=mode == "accumulate")
    lora_decode.lora_delta(x, a_all, bs, scales, got, **kw)
    lora_decode.lora_delta_reference(x, a_all, bs, scales, want, **kw)
    xa = (x.float() @ a_all.float().t()).abs()
    for i, (g_, w_, b) in enumerate(zip(got, want, bs)):
        r0 = sum(bb.shape[1] for bb in bs[:i])
        bound = (xa[:, r0:r0 + b.shape[1]] * scales[i]) @ b.float().abs().t() * 2 ** -7 + w_.float().abs() * 2 ** -7
        assert ((g_.float() - w_.float()).abs() <= bound + 1e-6).all()
