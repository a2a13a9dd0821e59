"""NEFTune (SFTConfig.neftune_noise_alpha, train/neftune.py): the noise of transformers' hook, at the place
transformers' models put it (after Gemma's scale, before Granite's multiplier), in training forwards only; our
SFTTrainer's per-step losses with it equal TRL's SFTTrainer's."""
import pytest
import torch
import transformers

from fasttune import FastLanguageModel, SFTConfig
from fasttune.errors import ConfigError
from fasttune.train.neftune import neftune_noise
from sft_twins import our_sft, trl_sft

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma3_text", "granite"])
def test_noise_lands_where_transformers_puts_it(tiny_model_dir, family):
    """Seeded alike, our model's training-mode logits under NEFTune equal transformers' model's under
    transformers' own hook (the same uniform draw, added after Gemma's sqrt(hidden) scale and before Granite's
    embedding multiplier), and differ from the logits without noise; in eval mode the hook adds nothing."""
    folder = tiny_model_dir(family)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 250, (2, 11))
    ours.train(), theirs.train()
    clean = ours(input_ids=ids).logits
    with neftune_noise(ours, 5.0):
        torch.manual_seed(7)
        noisy = ours(input_ids=ids).logits
        ours.eval()
        torch.testing.assert_close(ours(input_ids=ids).logits, clean, rtol=0, atol=1e-5)
    handle = transformers.integrations.neftune.activate_neftune(theirs, 5.0)
    torch.manual_seed(7)
    expected = theirs(input_ids=ids).logits
    handle.remove()
    torch.testing.assert_close(noisy, expected, rtol=1e-4, atol=1e-5)
    assert (noisy - clean).abs().max() > 1e-3
    assert not ours.get_input_embeddings()._forward_hooks  # removed with the block


def test_embedding_module_returns_what_transformers_gemma_returns(tiny_model_dir):
    """Gemma's scale sits inside embed_tokens, as in transformers' Gemma3TextScaledWordEmbedding (so hooks and
    callers of get_input_embeddings() see the scaled rows); the state dict keeps nn.Embedding's one weight."""
    folder = tiny_model_dir("gemma3_text")
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 250, (1, 9))
    torch.testing.assert_close(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids), rtol=0, atol=0)
    assert list(ours.get_input_embeddings().state_dict()) == ["weight"]


class _SeedEachStep(transformers.TrainerCallback):
    """Both trainers draw the step's noise from the same generator state."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.manual_seed(1000 + state.global_step)


def test_sft_losses_equal_trl_sft_trainer_with_neftune(tiny_model_dir, tmp_path):
    """Three steps with neftune_noise_alpha=5 give TRL's SFTTrainer's per-step losses and eval loss (our model in
    both), and differ from the run without noise; evaluation adds no noise."""
    folder = tiny_model_dir("gemma3_text")
    ours, our_eval, trainer = our_sft(folder, tmp_path / "ours", callbacks=[_SeedEachStep], neftune_noise_alpha=5.0)
    assert not trainer.model.get_input_embeddings()._forward_hooks
    plain = our_sft(folder, tmp_path / "plain", callbacks=[_SeedEachStep])[0]
    theirs, their_eval, _ = trl_sft(folder, tmp_path / "trl", callbacks=[_SeedEachStep], neftune_noise_alpha=5.0)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    assert ours[0] != pytest.approx(plain[0], rel=1e-4)
    assert our_eval == pytest.approx(their_eval, rel=1e-5)


def test_neftune_settings(tmp_path):
    assert SFTConfig(output_dir=str(tmp_path), neftune_noise_alpha=5).neftune_noise_alpha == 5
    with pytest.raises(ConfigError, match=r"neftune_noise_alpha=-1.0 is invalid"):
        SFTConfig(neftune_noise_alpha=-1)
    with pytest.raises(ConfigError, match="use one of the two"):
        SFTConfig(neftune_noise_alpha=5, cuda_graphs=True)
    from fasttune import DPOConfig

    with pytest.raises(ConfigError, match=r"DPOConfig\(neftune_noise_alpha=5\).*supervised fine-tuning"):
        DPOConfig(neftune_noise_alpha=5)
