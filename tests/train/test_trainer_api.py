"""train/trainer_api.py: transformers' Trainer methods scripts call around training (save_model, save_state,
log_metrics, save_metrics, is_world_process_zero, processing_class; push_to_hub refused)."""
import json

import pytest

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

ROWS = [{"text": f"alpha beta gamma {i}"} for i in range(4)]


def test_the_methods_scripts_call_after_training(tiny_model_dir, tmp_path, capsys):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    out = tmp_path / "out"
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS,
                         args=SFTConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=2))
    metrics = trainer.train()
    assert trainer.processing_class is tok and trainer.is_world_process_zero() and trainer.is_local_process_zero()
    trainer.save_model()  # args.output_dir, as transformers' Trainer
    trainer.save_model(str(tmp_path / "m"))
    for folder in (out, tmp_path / "m"):
        assert (folder / "adapter_config.json").exists() and (folder / "tokenizer_config.json").exists()
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"))
    assert reloaded.lora_settings.r == 4
    trainer.save_state()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    trainer.log_metrics("train", metrics)
    assert "***** train metrics *****" in capsys.readouterr().out
    trainer.save_metrics("train", {"train_loss": 1.5})
    trainer.save_metrics("eval", {"eval_loss": 2.5})
    assert json.loads((out / "train_results.json").read_text()) == {"train_loss": 1.5}
    assert json.loads((out / "all_results.json").read_text()) == {"train_loss": 1.5, "eval_loss": 2.5}
    with pytest.raises(ConfigError, match="huggingface-cli upload"):
        trainer.push_to_hub()
