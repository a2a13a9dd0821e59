"""train/config_names.py: settings written for TRL's and transformers' configs work with the import changed, or fail
with a ConfigError naming the setting (not Python's TypeError)."""
import pytest

from fasttune import DPOConfig, SFTConfig
from fasttune.errors import ConfigError


def test_trl_names_translate_and_bookkeeping_is_accepted():
    c = SFTConfig(output_dir="o", max_length=512, gradient_checkpointing=True, save_strategy="steps", save_steps=5,
                  eval_strategy="no", run_name="r", logging_dir="logs", dataloader_num_workers=2,
                  remove_unused_columns=False, push_to_hub=False, completion_only_loss=None)
    assert (c.max_seq_length, c.save_steps) == (512, 5)
    assert SFTConfig(save_strategy="no", save_steps=10).save_steps == 0
    assert DPOConfig(output_dir="o", max_length=256).max_seq_length == 256


@pytest.mark.parametrize("kw, match", [
    (dict(push_to_hub=True), "push_to_hub=True.*upload the folder yourself"),
    (dict(save_strategy="epoch"), "save_strategy='epoch'.*save_steps=N"),
    (dict(eval_strategy="epoch"), "eval_strategy='epoch'.*eval_steps=N"),
    (dict(neftune_noise_alpha=5.0), "NEFTune"),
    (dict(assistant_only_loss=True), "train_on_responses_only=True"),
    (dict(padding_free=True), "packing=True"),
    (dict(max_lenght=3), "unknown setting 'max_lenght'. Did you mean 'max_seq_length'"),
    (dict(max_length=3, max_seq_length=4), "max_length and max_seq_length are the same setting"),
])
def test_unsupported_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**kw)
