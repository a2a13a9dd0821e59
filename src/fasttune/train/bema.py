"""BEMA, bias-corrected exponential moving averages of the weights (Block & Zhang 2025, "EMA Without the Lag",
arXiv 2508.00180), as TRL 1.16's `BEMACallback` computes them:

    theta'_t = alpha_t (theta_t - theta_0) + EMA_t,   EMA_t = (1 - beta_t) EMA_{t-1} + beta_t theta_t,
    alpha_t = (lag + multiplier t)^-bias_power,       beta_t = max((lag + multiplier t)^-ema_power, min_ema_multiplier)

theta_0 and EMA are snapshots of the weights taken at step `update_after` (at the start of training when that step
never comes, e.g. the default 0); the average moves after every `update_freq`-th step after it, and is written to
<output_dir>/bema at the end of training by the model's own save_pretrained.

TRL's callback copies the whole model (`type(model)(model.config)`) and zips the trainable parameters with all of the
copy's, so it works for full fine-tuning only. This one averages the trainable parameters, so on a LoRA model the
average is of the adapter (each A, B and modules_to_save, as TRL's adapter EMA averages them) and bema/ is a PEFT
adapter; with full fine-tuning it is every weight and bema/ a transformers checkpoint. Passing TRL's BEMACallback to a
fasttune trainer runs this one with its settings (train/callbacks.py).

update_ref_model (TRL's experimental bema_for_ref_model): after every ref_model_update_freq-th step from
ref_model_update_after on, the reference of DPO, KTO, GRPO (beta > 0), ... takes the averaged weights: the copy of
every weight with full fine-tuning (TRL loads the average into its reference model: the same), the reference adapter
on LoRA (TRL's PEFT path loads the average into the base model instead).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from fasttune.errors import ConfigError

SETTINGS = ("update_freq", "ema_power", "bias_power", "lag", "update_after", "multiplier", "min_ema_multiplier",
            "device")
REF_SETTINGS = ("update_ref_model", "ref_model_update_freq", "ref_model_update_after")  # TRL's experimental ones


class BEMACallback(TrainerCallback):
    """BEMA of the trainable weights (module docstring), TRL's settings and defaults: update_freq (steps between
    updates, 400), ema_power (kappa, 0.5), bias_power (eta, 0.2), lag (rho, 10), update_after (tau, 0),
    multiplier (gamma, 1.0), min_ema_multiplier (0.0), device (where the three copies of the trainable weights live,
    "cpu"), and TRL's experimental update_ref_model (False), ref_model_update_freq (400), ref_model_update_after (0)
    (module docstring). After training, `weights` holds {parameter name: averaged tensor} and <output_dir>/bema the
    saved model. Raises ConfigError for update_freq or ref_model_update_freq < 1 and, at train start, under
    fsdp=True (sharded weights) or for update_ref_model on a trainer without a reference."""

    def __init__(self, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2, lag: int = 10,
                 update_after: int = 0, multiplier: float = 1.0, min_ema_multiplier: float = 0.0,
                 device: str = "cpu", update_ref_model: bool = False, ref_model_update_freq: int = 400,
                 ref_model_update_after: int = 0):
        for name, value in (("update_freq", update_freq), ("ref_model_update_freq", ref_model_update_freq)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"BEMACallback({name}={value!r}) is invalid: the optimizer steps between updates, "
                                  f"a whole number >= 1.")
        self.update_ref_model, self.ref_model_update_freq = update_ref_model, ref_model_update_freq
        self.ref_model_update_after = ref_model_update_after
        self.trainer = None  # set by the trainer's callbacks (bind_trainer): whose reference update_ref_model moves
        self.update_freq, self.ema_power, self.bias_power, self.lag = update_freq, ema_power, bias_power, lag
        self.update_after, self.multiplier, self.min_ema_multiplier = update_after, multiplier, min_ema_multiplier
        self.device = device
        self.params: dict[str, torch.nn.Parameter] = {}
        self.theta0: dict[str, torch.Tensor] = {}
        self.ema: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    @classmethod
    def from_trl(cls, callback) -> "BEMACallback":
        """This callback with the settings of TRL's BEMACallback instance `callback` (its experimental subclass's
        reference settings too)."""
        return cls(**{name: getattr(callback, name) for name in SETTINGS + REF_SETTINGS if hasattr(callback, name)})

    def bind_trainer(self, trainer):
        """The trainer whose reference update_ref_model moves (called when the callback is added)."""
        self.trainer = trainer

    def ema_beta(self, step: int) -> float:
        """beta_t = max((lag + multiplier t)^-ema_power, min_ema_multiplier)."""
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def bema_alpha(self, step: int) -> float:
        """alpha_t = (lag + multiplier t)^-bias_power."""
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Snapshot the trainable weights (theta_0, the EMA, the average); with update_ref_model, make sure the
        trainer's reference holds a copy to move. Raises ConfigError under fsdp=True, or for update_ref_model on a
        trainer without a reference."""
        if getattr(args, "fsdp", False):
            raise ConfigError("BEMACallback with fsdp=True is not implemented (the average would need the gathered "
                              "weights every update); train on one GPU or with DDP, or drop the callback.")
        if self.update_ref_model:
            reference = getattr(self.trainer, "reference", None)
            if reference is None:
                raise ConfigError(f"BEMACallback(update_ref_model=True) moves the reference to the average, but "
                                  f"{type(self.trainer).__name__} takes no reference passes here (no reference "
                                  f"objective, beta=0, or reference log-probs computed before training). Leave "
                                  f"update_ref_model off.")
            if not reference.is_copy:  # a fresh adapter's reference (the base): the copy the updates move
                reference.saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.theta0 = {n: p.detach().to(self.device, copy=True) for n, p in self.params.items()}
        self.ema = {n: t.clone() for n, t in self.theta0.items()}
        self.weights = {n: t.clone() for n, t in self.theta0.items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        """After optimizer step state.global_step: the snapshots at update_after, the average's update every
        update_freq steps after it, and (update_ref_model) the reference set to the average every
        ref_model_update_freq steps from ref_model_update_after."""
        step = state.global_step
        if step < self.update_after:
            return
        if step == self.update_after:  # the snapshots are taken here
            for n, p in self.params.items():
                self.theta0[n].copy_(p.detach())
                self.ema[n].copy_(p.detach())
        elif (step - self.update_after) % self.update_freq == 0:
            beta, alpha = self.ema_beta(step), self.bema_alpha(step)
            for n, p in self.params.items():
                theta = p.detach().to(self.device)
                self.ema[n].mul_(1 - beta).add_(theta, alpha=beta)
                self.weights[n].copy_(self.ema[n] + alpha * (theta - self.theta0[n]))
        after = step - self.ref_model_update_after
        if self.update_ref_model and after >= 0 and after % self.ref_model_update_freq == 0:
            saved = self.trainer.reference.saved
            for n, w in self.weights.items():
                saved[n].copy_(w)

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Save the model with the averaged weights to <output_dir>/bema (rank 0), then put the trained ones back."""
        if not state.is_world_process_zero or not self.params:
            return
        current = {n: p.detach().clone() for n, p in self.params.items()}
        try:  # the averaged weights in place for the save, then the trained ones back
            for n, p in self.params.items():
                p.copy_(self.weights[n])
            model.save_pretrained(str(Path(args.output_dir) / "bema"))
        finally:
            for n, p in self.params.items():
                p.copy_(current[n])
