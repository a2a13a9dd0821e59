"""Gemma 4's released checkpoints (Gemma4ForConditionalGeneration, model_type "gemma4") on our decoder, text batches:
the language model runs our kernels, the vision tower and its embedder load frozen as transformers builds them,
adapters and merged checkpoints carry transformers' names, audio without an audio tower is refused by name, and a
Gemma 4 that is not a causal language model (bidirectional attention everywhere) stays on the transformers fallback. Images are
tests/models/test_vision.py's (the gemma4 family of its fixtures)."""
import pytest
import torch
from tiny import TINY

from fasttune import FastLanguageModel, FastModel
from fasttune.errors import ConfigError

TEXT = dict(TINY, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
            sliding_window=4, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
            final_logit_softcapping=30.0)


def _save(folder, **text):
    from tiny_vision import save_gemma4

    return save_gemma4(folder, **text)


@pytest.fixture(scope="module")
def gemma4_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("gemma4") / "m")


def _hf(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def _ids():
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def test_text_logits_equal_transformers(gemma4_dir):
    from fasttune.models.vision import VisionCausalLM

    model, _ = FastLanguageModel.from_pretrained(str(gemma4_dir), dtype=torch.float32)
    assert isinstance(model, VisionCausalLM) and model.arch.model_type == "gemma4_text"
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    ids, mask = _ids()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = _hf(gemma4_dir)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_adapter_names_and_merged_checkpoint_load_in_transformers(gemma4_dir, tmp_path):
    from peft_oracle import randomize_lora_b
    from safetensors import safe_open

    model, _ = FastLanguageModel.from_pretrained(str(gemma4_dir), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".language_model.layers." in k for k in keys)
    assert not any("layers.1.self_attn.v_proj" in k for k in keys)  # the full layer takes its values from k_proj
    model.save_pretrained_merged(tmp_path / "merged", save_method="merged_16bit")
    ids, mask = _ids()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        merged = _hf(tmp_path / "merged")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], merged[real], rtol=1e-4, atol=1e-4)


def test_audio_without_an_audio_tower_and_frames_without_positions_are_named(gemma4_dir):
    """Audio needs an audio tower (E2B / E4B: tests/models/test_gemma4_audio.py); video frames need their patch
    positions (tests/models/test_gemma4_video.py)."""
    model, _ = FastLanguageModel.from_pretrained(str(gemma4_dir), dtype=torch.float32)
    ids, mask = _ids()
    with pytest.raises(ConfigError, match="no audio tower.*input_features were passed"):
        model(ids, attention_mask=mask, input_features=torch.zeros(1, 8, 128))
    with pytest.raises(ConfigError, match="pixel_values_videos need video_position_ids"):
        model(ids, attention_mask=mask, pixel_values_videos=torch.zeros(1, 4, 588))
    with pytest.raises(ConfigError, match="finetune_audio_layers=True: this gemma4 model has no audio tower"):
        FastModel.get_peft_model(model, r=4, finetune_audio_layers=True)


def test_e2b_layout_with_images_equals_transformers(tmp_path):
    """E2B / E4B with images: the per-layer embeddings look up the pad token at the image positions (transformers'
    llm_input_ids) while the per-layer projection reads the embeddings with the image features in; logits and
    greedy generation from an image prompt equal transformers'."""
    from tiny_vision import solid_image
    from transformers import AutoModelForImageTextToText

    from fasttune import FastVisionModel

    folder = _save(tmp_path / "e2b", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                   hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, num_kv_shared_layers=2)
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch = proc.prompt_inputs([[{"type": "image", "image": solid_image("red")}, {"type": "text", "text": "hue?"}],
                                [{"type": "text", "text": "and"},
                                 {"type": "image", "image": solid_image((0, 0, 255), (84, 56))}]])
    marks = (batch["input_ids"] == proc.image_token_id).long()
    with torch.no_grad():
        ref = hf(**batch, mm_token_type_ids=marks).logits
        ours = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    want = hf.generate(**batch, mm_token_type_ids=marks, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), want)


def test_e2b_layout_text_logits_equal_transformers(tmp_path):
    """E2B / E4B: per-layer embeddings (looked up from the ids, which the text-only path passes through) and layers
    reusing keys and values."""
    folder = _save(tmp_path / "e2b", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                   hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, num_kv_shared_layers=2,
                   use_double_wide_mlp=True)
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    assert model.arch.per_layer_input_size == 8 and model.arch.kv_shared_layers == 2
    ids, mask = _ids()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = _hf(folder)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_26b_a4b_layout_text_logits_equal_transformers(tmp_path):
    """26B-A4B: experts beside each layer's dense MLP."""
    folder = _save(tmp_path / "moe", enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    assert model.arch.moe_block == "gemma4"
    ids, mask = _ids()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = _hf(folder)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_an_all_bidirectional_gemma4_stays_on_the_fallback():
    """use_bidirectional_attention="all" (an embedding model's) is not a causal language model."""
    from fasttune.models.config import decoder_runs

    assert not decoder_runs({**TEXT, "model_type": "gemma4_text", "use_bidirectional_attention": "all"})
    assert decoder_runs({**TEXT, "model_type": "gemma4_text", "use_bidirectional_attention": "vision"})


def test_gguf_export_refuses_a_tower_llama_cpp_rotates_otherwise(gemma4_dir, tmp_path):
    """llama.cpp's gemma4v fixes the vision RoPE base at 100: another base is refused before writing (the export
    itself runs in llama.cpp in tests/export/test_gguf_mmproj.py)."""
    model, tok = FastLanguageModel.from_pretrained(str(gemma4_dir), dtype=torch.float32)
    model.hf_config.vision_config.rope_parameters = {"rope_type": "axial", "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="RoPE base 10000; llama.cpp's gemma4v uses 100"):
        model.save_pretrained_gguf(tmp_path / "m.gguf", tok, quantization_method="f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()
