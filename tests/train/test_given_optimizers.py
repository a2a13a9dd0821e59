"""transformers' `optimizers=(optimizer, lr_scheduler)` on our trainers (train/optim.py's given_optimizers): the
given objects are the ones stepped, a missing scheduler comes from the config, and the refusals."""
import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

ROWS = [{"text": "word " * (4 + i % 5)} for i in range(8)]


def _model(tiny_model_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    return FastLanguageModel.get_peft_model(model, r=4, random_state=0), tok


def _train(model, tok, tmp_path, optimizers=None, **config):
    args = SFTConfig(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=1, logging_steps=1, save_steps=0, learning_rate=1e-3,
                               weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, report_to="none"),
                        **config})
    trainer = SFTTrainer(model, tok, train_dataset=ROWS, args=args, optimizers=optimizers)
    trainer.train()
    return trainer


def test_given_adamw_trains_as_the_configs_own(tiny_model_dir, tmp_path):
    """AdamW with the config's settings, given from outside, gives the config's own loss curve; the trainer steps
    the very object given."""
    curves = []
    for given in (False, True):
        model, tok = _model(tiny_model_dir)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0) if given else None
        trainer = _train(model, tok, tmp_path / str(given), optimizers=(opt, None))
        assert (trainer.optimizer is opt) == given
        curves.append([h["loss"] for h in trainer.log_history if "loss" in h])
    assert curves[0] == pytest.approx(curves[1], rel=1e-6)


def test_given_scheduler_sets_the_learning_rate(tiny_model_dir, tmp_path):
    """SGD with a StepLR halving every step: the logged learning rates are the scheduler's (the config's lr and
    schedule do not apply); without a scheduler the config's constant schedule runs on SGD's own lr."""
    model, tok = _model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    trainer = _train(model, tok, tmp_path / "a", optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)))
    assert [h["learning_rate"] for h in trainer.log_history if "loss" in h] == pytest.approx([0.1, 0.05, 0.025])
    model, tok = _model(tiny_model_dir)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    trainer = _train(model, tok, tmp_path / "b", optimizers=(opt, None))
    assert [h["learning_rate"] for h in trainer.log_history if "loss" in h] == pytest.approx([0.2] * 3)


def test_refusals(tiny_model_dir, tmp_path):
    model, tok = _model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    cases = [("pair", opt), ("needs the optimizer", (None, torch.optim.lr_scheduler.StepLR(opt, 1))),
             ("torch.optim.Optimizer", ("sgd", None)), ("learning-rate scheduler", (opt, "linear")),
             ("none of the model's trainable", (torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1), None))]
    for match, optimizers in cases:
        with pytest.raises(ConfigError, match=match):
            SFTTrainer(model, tok, train_dataset=ROWS, args=SFTConfig(output_dir=str(tmp_path / "out")),
                       optimizers=optimizers)
    with pytest.raises(ConfigError, match="fsdp=True"):
        from fasttune.train.optim import given_optimizers

        given_optimizers((opt, None), model, SFTConfig(fsdp=True))
    assert not (tmp_path / "out").exists()
