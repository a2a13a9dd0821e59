"""transformers TrainerCallbacks on our trainers (train/callbacks.py): the events in transformers' order with its
state, the control flags the loop honours, transformers' own callbacks, and the refusals."""
import pytest
import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_callback import EarlyStoppingCallback

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

ROWS = [{"text": "word " * (4 + i % 5)} for i in range(8)]


class Recorder(TrainerCallback):
    """Every event with the state's step, and the keyword arguments of the first call of each event."""

    def __init__(self):
        self.events, self.kwargs = [], {}

    def __getattribute__(self, name):
        if name.startswith("on_"):
            def record(args, state, control, **kwargs):
                self.events.append((name, state.global_step))
                self.kwargs.setdefault(name, kwargs)
            return record
        return super().__getattribute__(name)


def _trainer(tiny_model_dir, tmp_path, callbacks, **config):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, logging_steps=1, save_steps=0, learning_rate=1e-3,
                    report_to="none")  # 4 steps an epoch
    return SFTTrainer(model, tok, train_dataset=ROWS, eval_dataset=ROWS[:2], callbacks=callbacks,
                      args=SFTConfig(**{**settings, **config}))


def test_events_in_transformers_order_with_its_state(tiny_model_dir, tmp_path):
    """Five steps, four to an epoch: eval every 2 steps, checkpoints at 4 and at the last step."""
    rec = Recorder()
    trainer = _trainer(tiny_model_dir, tmp_path, [rec], max_steps=5, eval_steps=2, save_steps=4)
    trainer.train()
    step_events = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log"]
    want = [("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0)]
    for step in range(1, 6):
        if step == 5:
            want += [("on_epoch_end", 4), ("on_epoch_begin", 4)]
        want += [(e, step - 1 if e in ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step") else step)
                 for e in step_events]
        if step % 2 == 0:  # one eval batch (2 rows)
            want += [("on_prediction_step", step), ("on_evaluate", step), ("on_log", step)]
        if step in (4, 5):
            want += [("on_save", step)]
    want += [("on_prediction_step", 5), ("on_evaluate", 5), ("on_log", 5), ("on_epoch_end", 5), ("on_train_end", 5)]
    assert rec.events == want
    # the keyword arguments transformers passes, with the loop's objects
    assert rec.kwargs["on_step_end"]["model"] is trainer.model
    assert rec.kwargs["on_step_end"]["optimizer"] is trainer.optimizer
    assert rec.kwargs["on_step_end"]["lr_scheduler"] is not None
    assert "loss" in rec.kwargs["on_log"]["logs"] and "eval_loss" in rec.kwargs["on_evaluate"]["metrics"]
    state = trainer.state
    assert (state.global_step, state.max_steps) == (5, 5) and state.log_history is trainer.log_history
    assert state.epoch == pytest.approx(1.25) and state.num_input_tokens_seen > 0


def test_substeps_and_prediction_steps(tiny_model_dir, tmp_path):
    """Gradient accumulation 3: on_substep_end after the first two micro-batches of each step, as transformers
    fires it; one on_prediction_step per evaluation batch."""
    rec = Recorder()
    _trainer(tiny_model_dir, tmp_path, [rec], max_steps=2, per_device_train_batch_size=1,
             gradient_accumulation_steps=3, eval_steps=2, per_device_eval_batch_size=1).train()
    names = [e for e, _ in rec.events]
    first = names[names.index("on_step_begin"):names.index("on_step_end")]
    assert first == ["on_step_begin", "on_substep_end", "on_substep_end", "on_pre_optimizer_step",
                     "on_optimizer_step"]
    assert names.count("on_substep_end") == 4 and names.count("on_prediction_step") == 2  # 1 eval x 2 batches


class _Control(TrainerCallback):
    """Sets one control flag at one step's end."""

    def __init__(self, flag, at):
        self.flag, self.at = flag, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            setattr(control, self.flag, True)
        return control


def test_control_flags_are_honoured(tiny_model_dir, tmp_path):
    """should_training_stop ends training after that step (no checkpoint of its own); should_log / should_evaluate
    / should_save act at that step although the *_steps settings would not."""
    trainer = _trainer(tiny_model_dir, tmp_path, [_Control("should_training_stop", 2)])
    metrics = trainer.train()
    assert metrics["global_step"] == 2 and not metrics["interrupted"]
    assert not list((tmp_path / "out").glob("checkpoint-*"))

    trainer = _trainer(tiny_model_dir, tmp_path / "b", [_Control("should_log", 1), _Control("should_evaluate", 1),
                                                         _Control("should_save", 1)],
                       logging_steps=10, max_steps=2)
    trainer.train()
    assert [h["step"] for h in trainer.log_history if "loss" in h] == [1, 2]  # step 1 asked for; 2 is the last
    assert [h["step"] for h in trainer.log_history if "eval_loss" in h] == [1, 2]
    assert (tmp_path / "b" / "out" / "checkpoint-1").is_dir()


def test_transformers_callbacks_and_the_trainer_methods(tiny_model_dir, tmp_path, capsys):
    """A class is instantiated as transformers does; add/pop/remove_callback; PrinterCallback prints each log entry
    (and pops keys from its copy, not from the trainer's log history)."""
    trainer = _trainer(tiny_model_dir, tmp_path, [PrinterCallback], max_steps=2)
    rec = Recorder()
    trainer.add_callback(rec)
    assert trainer.pop_callback(Recorder) is rec and trainer.pop_callback(Recorder) is None
    trainer.add_callback(rec)
    trainer.remove_callback(rec)
    trainer.train()
    assert rec.events == []
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2
    assert all("learning_rate" in h for h in trainer.log_history if "loss" in h)


def test_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        _trainer(tiny_model_dir, tmp_path, [EarlyStoppingCallback(early_stopping_patience=2)])
    with pytest.raises(ConfigError, match="TrainerCallback"):
        _trainer(tiny_model_dir, tmp_path, [lambda *a: None])
    assert not (tmp_path / "out").exists()


def test_no_callbacks_changes_nothing(tiny_model_dir, tmp_path):
    """The same losses with a callback that only watches as without callbacks."""
    losses = []
    for callbacks in (None, [Recorder()]):
        torch.manual_seed(0)
        trainer = _trainer(tiny_model_dir, tmp_path / str(len(losses)), callbacks, max_steps=3)
        trainer.train()
        losses.append([h["loss"] for h in trainer.log_history if "loss" in h])
    assert losses[0] == losses[1]
