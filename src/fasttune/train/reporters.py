"""Logging integrations (`report_to`): each trainer log entry also goes to TensorBoard and/or Weights & Biases.

A Reporter gets every entry the trainer logs (`log(entry)`, from `Trainer._log` only) and is closed at the end
of `train()`. Scalars are named as transformers' Trainer names them: `train/loss`, `train/learning_rate`,
`train/grad_norm`, ..., and `eval/loss`; the x axis is the optimizer step.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fasttune.errors import ConfigError

INTEGRATIONS = ("tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb (and `wandb login`)"}


def parse_report_to(value) -> list[str]:
    """"none" | "tensorboard" | "wandb" | "all" | "a,b" | a list -> the integrations, validated and installed."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if "all" in names:
        return [n for n in INTEGRATIONS if importlib.util.find_spec(n) is not None]
    names = [n for n in dict.fromkeys(names) if n != "none"]
    for n in names:
        if n not in INTEGRATIONS:
            raise ConfigError(f"report_to={value!r}: '{n}' is not available; use none, all, "
                              f"{', '.join(INTEGRATIONS)}, or a comma-separated list of them.")
        if importlib.util.find_spec(n) is None:
            raise ConfigError(f"report_to includes '{n}' but the {n} package is not installed. Install it with "
                              f"`{_INSTALL[n]}`, or drop '{n}' from report_to (--report-to none).")
    return names


def scalars(entry: dict) -> dict[str, float]:
    """A log entry's numbers under transformers' scalar names: `eval_x` -> `eval/x`, anything else -> `train/x`.
    `step`, booleans and non-numbers are left out."""
    out = {}
    for key, value in entry.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class Reporter:
    """The interface of a logging integration."""

    def log(self, entry: dict):
        """Record one trainer log entry (it has a `step`)."""
        raise NotImplementedError

    def close(self):
        """Flush and finish at the end of train(); the default does nothing."""
        pass


class TensorBoardReporter(Reporter):
    """Event files in output_dir/runs (view with `tensorboard --logdir OUTPUT_DIR/runs`)."""

    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))

    def log(self, entry: dict):
        """Each scalar of the entry at x = entry["step"], flushed to disk."""
        for name, value in scalars(entry).items():
            self.writer.add_scalar(name, value, entry["step"])
        self.writer.flush()  # an interrupted run keeps what it logged

    def close(self):
        """Close the event file."""
        self.writer.close()


class WandbReporter(Reporter):
    """One W&B run per train() call; project from WANDB_PROJECT (default "fasttune"), files under output_dir."""

    def __init__(self, output_dir: Path, config: dict):
        import os

        import wandb

        self.wandb = wandb
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fasttune"), dir=str(output_dir),
                              config=config)

    def log(self, entry: dict):
        """The entry's scalars as one W&B log call at step = entry["step"]."""
        self.run.log(scalars(entry), step=entry["step"])

    def close(self):
        """Finish the W&B run."""
        self.run.finish()


class Reporters(Reporter):
    """All of a run's reporters as one."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def log(self, entry: dict):
        """Pass the entry to every reporter."""
        for r in self.reporters:
            r.log(entry)

    def close(self):
        """Close every reporter."""
        for r in self.reporters:
            r.close()


def open_reporters(args) -> Reporters:
    """The reporters named by `args.report_to` (a TrainingConfig), writing next to args.output_dir."""
    from dataclasses import asdict

    made = []
    for name in parse_report_to(args.report_to):
        made.append(TensorBoardReporter(args.output_dir) if name == "tensorboard"
                    else WandbReporter(args.output_dir, asdict(args)))
    return Reporters(made)
