"""SFTConfig.label_smoothing_factor: transformers' LabelSmoother's loss (the kernels: tests/kernels/
test_cross_entropy_kernel.py), here end to end against trl.SFTTrainer; and the transformers class names that let
transformers' Trainer shift the labels of our models when it smooths them itself."""
import pytest
import torch

from fasttune import FastLanguageModel
from sft_twins import our_sft, trl_sft

pytest.importorskip("trl")


def test_sft_losses_equal_trl_sft_trainer_with_label_smoothing(tiny_model_dir, tmp_path):
    """Two micro-batches a step, three steps: per-step losses and the eval loss (smoothed too, as transformers
    evaluates) equal trl.SFTTrainer's on our model with label_smoothing_factor=0.2, and differ from the plain loss."""
    folder = tiny_model_dir("llama")
    ours, our_eval, _ = our_sft(folder, tmp_path / "ours", bs=3, ga=2, label_smoothing_factor=0.2)
    theirs, their_eval, _ = trl_sft(folder, tmp_path / "trl", bs=3, ga=2, label_smoothing_factor=0.2)
    plain, plain_eval, _ = our_sft(folder, tmp_path / "plain", bs=3, ga=2)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    assert our_eval == pytest.approx(their_eval, rel=1e-5)
    assert abs(ours[0] - plain[0]) > 1e-3 and abs(our_eval - plain_eval) > 1e-3  # 20x the tolerance above


def test_fallback_model_with_label_smoothing_equals_trl(tiny_model_dir, tmp_path):
    """The transformers fallback (fast=False) smooths in its own loss, as TRL's trainer does on it."""
    folder = tiny_model_dir("qwen2")
    ours, our_eval, _ = our_sft(folder, tmp_path / "ours", steps=2, load={"fast": False}, label_smoothing_factor=0.1)
    theirs, their_eval, _ = trl_sft(folder, tmp_path / "trl", steps=2, load={"fast": False}, label_smoothing_factor=0.1)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    assert our_eval == pytest.approx(their_eval, rel=1e-5)


def test_models_carry_their_transformers_class_name(tiny_model_dir):
    """transformers' Trainer shifts the labels it smooths only for names in its causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = tiny_model_dir("gemma3_text")
    model, _ = FastLanguageModel.from_pretrained(str(folder))
    assert model._get_name() == "Gemma3ForCausalLM" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    assert repr(model).startswith("Gemma3ForCausalLM(")
    fallback, _ = FastLanguageModel.from_pretrained(str(folder), fast=False)
    assert fallback._get_name() == "Gemma3ForCausalLM"
    from tiny import load_classifier

    assert load_classifier(tiny_model_dir("llama"))[0]._get_name() == "LlamaForSequenceClassification"


def test_transformers_finds_only_labels_as_label_columns():
    """transformers' Trainer takes every forward keyword with "label" in its name for a label column (find_labels):
    ours must have `labels` alone, or its evaluation drops compute_metrics."""
    from transformers.utils import find_labels

    from fasttune.models.causal_lm import CausalLM
    from fasttune.models.fallback import FallbackModel
    from fasttune.models.vision import VisionCausalLM

    for cls in (CausalLM, FallbackModel, VisionCausalLM):
        assert find_labels(cls) == ["labels"], cls
