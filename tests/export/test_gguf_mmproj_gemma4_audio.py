"""Gemma 4's audio tower in the mmproj (export/gguf_mmproj_gemma4_audio.py), run by llama.cpp's own libmtmd
(llama-cpp-python's build) on a tiny E2B-like model with LoRA on the language model and both towers: llama.cpp's
audio embeddings and its logits after a prompt with a clip equal ours; settings clip's gemma4a fixes are refused
before anything is written."""
import numpy as np
import pytest
import torch
from llama_cpp_check import mtmd_run
from tiny_vision import save_with_bpe

from fasttune import FastVisionModel
from fasttune.errors import ConfigError

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def hearing(tmp_path_factory):
    """(model with trained-looking LoRA on the decoder and both towers, and finite clip bounds that bite, processor,
    folder)."""
    folder = save_with_bpe(tmp_path_factory.mktemp("gemma4a") / "m", "gemma4", audio=True)
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, finetune_vision_layers=True,
                                           finetune_audio_layers=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():  # Gemma4ClippableLinear's bounds (the release's are finite too)
            if name.startswith("audio_tower.") and name.endswith(("input_min", "output_min")):
                b.fill_(-1.5)
            elif name.startswith("audio_tower.") and name.endswith(("input_max", "output_max")):
                b.fill_(1.5)
    return model, proc, folder


def _clip(seconds: float) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.5).clip(-1, 1).astype(np.float32)


@pytest.mark.parametrize("float_type", ["f32", "f16"])
def test_llama_cpp_hears_the_exported_model_as_ours(float_type, hearing, tmp_path):
    """Embeddings within 0.2% of their range (f16: 1%; libmtmd's log-mel floors at 1e-3 where transformers adds it:
    5e-4 here; per_dim_scale without its softplus: 2e-2, the clip bounds left out: 1e-1), the last logits within
    0.1% (f16: 0.5%) with the same top token, the same token count (libmtmd's `<|audio>` and `<audio|>` around the
    clip's soft tokens). f16 keeps clip's fp32 tensors (the depthwise kernel ggml_ssm_conv takes) in fp32."""
    model, proc, _ = hearing
    text = model.save_pretrained_gguf(tmp_path / "g", proc, quantization_method=float_type, progress=False)
    clip, before, after = _clip(1.3), "Listen: ", " What was said?"
    batch = proc(text=[before + proc.audio_token + after], audio=[clip])
    with torch.no_grad():
        feats = model.audio_features(batch["input_features"], batch["input_features_mask"]).numpy()
        logits = model(**batch).logits[0, -1].numpy()
    theirs, their_logits, count = mtmd_run(text, tmp_path / "g" / f"mmproj.{float_type.upper()}.gguf", before, clip,
                                           after)
    assert count == batch["input_ids"].shape[1] and theirs.shape == feats.shape
    rel = np.abs(theirs - feats).max() / (feats.max() - feats.min())
    assert rel < (2e-3 if float_type == "f32" else 1e-2), rel
    rel = np.abs(their_logits - logits).max() / (logits.max() - logits.min())
    assert rel < (1e-3 if float_type == "f32" else 5e-3) and their_logits.argmax() == logits.argmax(), rel


@pytest.mark.parametrize("where, key, value", [("audio_config", "attention_chunk_size", 8),
                                               ("audio_config", "attention_logit_cap", 30.0),
                                               ("extractor", "mel_floor", np.array(1e-5)),
                                               ("extractor", "per_bin_mean", [0.0] * 128)])
def test_what_gemma4a_computes_otherwise_is_refused(where, key, value, hearing, tmp_path):
    model, proc, _ = hearing
    owner = model.hf_config.audio_config if where == "audio_config" else proc.audio_extractor
    before = getattr(owner, key)
    setattr(owner, key, value)
    try:
        with pytest.raises(ConfigError, match=f"cannot be exported to llama.cpp's gemma4a.*{key}="):
            model.save_pretrained_gguf(tmp_path / "g", proc, quantization_method="f16", progress=False)
    finally:
        setattr(owner, key, before)
    assert not (tmp_path / "g").exists()
