"""Loss / learning-rate plot written at the end of every run."""
from __future__ import annotations

from pathlib import Path

from fasttune.errors import write_error


def plot_losses(log_history: list[dict], path: Path) -> Path:
    """Write a PNG (or whatever `path`'s suffix names) of train loss, eval loss and, on a second axis, learning
    rate against the step, from the trainer's log entries; returns `path`. Needs matplotlib. A failed write raises
    WriteError (a ConfigError)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    lrs = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    marker = "o" if len(train) <= 50 else None  # markers while points are few: a lone point draws no line
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", marker=marker, markersize=4)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), "--", color="tab:gray", alpha=0.6, label="learning rate", marker=marker, markersize=3)
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title("fasttune training")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as e:
        raise write_error(e, "the loss plot", path) from None
    finally:
        plt.close(fig)
    return path
