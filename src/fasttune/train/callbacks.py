"""transformers' TrainerCallbacks (`callbacks=[...]`, `add_callback`) run by our training loop, so code written for
transformers' or TRL's trainers keeps its callbacks when only the import changes.

The events are transformers' (trainer_callback.TrainerCallback), fired at the same points of a step: on_init_end,
on_train_begin, on_epoch_begin, on_step_begin, on_pre_optimizer_step, on_optimizer_step, on_step_end, on_log,
on_evaluate, on_save, on_epoch_end, on_train_end, on_substep_end (after each gradient-accumulation micro-batch
but a step's last) and on_prediction_step (after each evaluation batch); each callback gets (args, state, control)
and the keyword arguments transformers passes (model, processing_class, optimizer, lr_scheduler, train_dataloader=None,
eval_dataloader=None; logs for on_log, metrics for on_evaluate). `state` is transformers' TrainerState, kept in step
with the loop; `control` is its TrainerControl, and the loop honours should_training_stop (stops after the step, on
every rank), should_log, should_evaluate and should_save (on top of logging_steps / eval_steps / save_steps).
on_predict fires from SFTTrainer.predict. Not honoured: should_epoch_stop (the loop's batches are planned per step,
not per epoch).
EarlyStoppingCallback needs load_best_model_at_end, which fasttune does not implement: it is refused. TRL's
BEMACallback is run as fasttune's (train/bema.py: the same average, of the trainable weights, so LoRA models too).
"""
from __future__ import annotations

import os
import sys

from fasttune.errors import ConfigError


class TrainerCallbacks:
    """The callbacks of one Trainer, with the TrainerState / TrainerControl they share. callbacks: TrainerCallback
    classes (instantiated here, as transformers does) or instances. Raises ConfigError for a callback fasttune cannot
    honour (EarlyStoppingCallback)."""

    def __init__(self, trainer, callbacks=None):
        from transformers.trainer_callback import TrainerControl, TrainerState

        self.trainer = trainer
        self.callbacks: list = []
        for cb in callbacks or []:
            self.add(cb)
        args = trainer.args
        self.state = TrainerState(logging_steps=args.logging_steps, eval_steps=args.eval_steps or 0,
                                  save_steps=args.save_steps or 0,
                                  train_batch_size=args.per_device_train_batch_size,
                                  num_train_epochs=args.num_train_epochs, log_history=trainer.log_history,
                                  is_local_process_zero=os.environ.get("LOCAL_RANK", "0") == "0",
                                  is_world_process_zero=trainer.dist.is_main)
        self.control = TrainerControl()
        self.epoch = None  # the epoch whose on_epoch_begin fired and on_epoch_end did not
        self.run = None  # the loop's state of the train() call in progress

    def add(self, callback):
        """Add a TrainerCallback class or instance (transformers' Trainer.add_callback)."""
        from transformers.trainer_callback import EarlyStoppingCallback, TrainerCallback

        cb = callback() if isinstance(callback, type) else callback
        from fasttune.train.bema import BEMACallback

        if type(cb).__name__ == "BEMACallback" and type(cb).__module__.startswith("trl."):
            cb = BEMACallback.from_trl(cb)  # TRL's copies the whole model; ours averages the trainable weights
        if isinstance(cb, BEMACallback):
            cb.bind_trainer(self.trainer)  # (update_ref_model moves this trainer's reference)
        if isinstance(cb, EarlyStoppingCallback):
            raise ConfigError("EarlyStoppingCallback needs load_best_model_at_end=True and metric_for_best_model, "
                              "which fasttune does not implement. Stop on your own condition with a TrainerCallback "
                              "that sets control.should_training_stop in on_evaluate (honoured after that step), or "
                              "train for a fixed max_steps.")
        if not isinstance(cb, TrainerCallback):
            raise ConfigError(f"callbacks takes transformers TrainerCallback classes or instances; got "
                              f"{type(cb).__name__}.")
        self.callbacks.append(cb)

    def pop(self, callback):
        """Remove and return the first callback of that class, or that instance (None if absent)."""
        for cb in self.callbacks:
            if (isinstance(cb, callback) if isinstance(callback, type) else cb is callback):
                self.callbacks.remove(cb)
                return cb
        return None

    def fire(self, event: str, **kwargs):
        """Call `event` on every callback in order; a callback's returned TrainerControl replaces the shared one.
        Returns the control."""
        if not self.callbacks:
            return self.control
        t = self.trainer
        extra = dict(model=t.model, processing_class=t.tokenizer, optimizer=getattr(t, "optimizer", None),
                     lr_scheduler=self.run.scheduler if self.run is not None else None, train_dataloader=None,
                     eval_dataloader=None)
        for cb in self.callbacks:
            result = getattr(cb, event)(t.args, self.state, self.control, **extra, **kwargs)
            if result is not None:
                self.control = result
        return self.control

    def sync(self, run):
        """The state's progress from the loop's run (global step, epoch as a float, tokens seen)."""
        s, t = self.state, self.trainer
        self.run = run
        s.global_step, s.max_steps, s.num_input_tokens_seen = run.step, run.total, run.tokens_seen
        s.epoch = t.epoch_progress(run)
        s.log_history = t.log_history

    def train_begin(self, run):
        """on_train_begin, with should_training_stop cleared (as transformers does)."""
        self.sync(run)
        self.control.should_training_stop = False
        self.fire("on_train_begin")

    def step_begin(self, run):
        """Before a step: on_epoch_end / on_epoch_begin when the step starts a new epoch, then on_step_begin (the
        step's should_log / should_evaluate / should_save start False, as in transformers)."""
        self.sync(run)
        if run.epoch != self.epoch:
            if self.epoch is not None:
                self.fire("on_epoch_end")
            self.epoch = run.epoch
            self.control.should_epoch_stop = False
            self.fire("on_epoch_begin")
        c = self.control
        c.should_log = c.should_evaluate = c.should_save = False
        self.fire("on_step_begin")

    def step_end(self, run):
        """After a step (and its optimizer step): on_step_end; returns the control the loop then reads."""
        self.sync(run)
        return self.fire("on_step_end")

    def stop_asked(self) -> bool:
        """Whether a callback on this rank asked to stop (the loop ORs it over the ranks with its signal check, so
        every rank stops after the same step)."""
        return bool(self.control.should_training_stop)

    def train_end(self, run, stopped_early: bool):
        """on_epoch_end for the open epoch, then on_train_end; stopped_early (a callback's stop) is said on stderr."""
        self.sync(run)
        if self.epoch is not None:
            self.fire("on_epoch_end")
            self.epoch = None
        if stopped_early and self.trainer.dist.is_main:
            print(f"fasttune: a callback stopped training at step {run.step}/{run.total} "
                  f"(control.should_training_stop).", file=sys.stderr)
        self.fire("on_train_end")


class CallbackMethods:
    """transformers' Trainer methods for callbacks, mixed into our Trainer (which sets `self.callbacks`)."""

    def add_callback(self, callback):
        """Add a TrainerCallback class or instance."""
        self.callbacks.add(callback)

    def pop_callback(self, callback):
        """Remove and return the first callback of this class, or this instance; None when there is none."""
        return self.callbacks.pop(callback)

    def remove_callback(self, callback):
        """Remove the first callback of this class, or this instance."""
        self.callbacks.pop(callback)

    @property
    def state(self):
        """transformers' TrainerState of this trainer (global_step, epoch, max_steps, log_history, ...)."""
        return self.callbacks.state
