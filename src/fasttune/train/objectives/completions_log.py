"""TRL's `log_completions` for GRPO and RLOO: the latest training step's prompts, completions, rewards (one column per
reward function), advantages and the columns reward functions add through `log_extra`, printed as a table at each
training log entry (with rich when it is installed, else as plain text) and written to
`output_dir/completions/completions_<step, 5 digits>.parquet` with TRL 1.16's columns (step, prompt, completion, the
rewards, the extra columns, advantage)."""
from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from fasttune.errors import WriteError


def without_images(value):
    """A prompt or completion as a table can hold it: chat messages with their image / video / audio payloads
    dropped (the item's type kept), strings as they are."""
    if isinstance(value, list):
        return [without_images(v) for v in value]
    if isinstance(value, dict):
        return {k: without_images(v) for k, v in value.items() if k not in ("image", "video", "audio")
                or not isinstance(value.get("type"), str)}
    return value


def as_text(value) -> str:
    """A prompt or completion as one string: messages as "role: content" lines (media items as <image> etc.)."""
    if isinstance(value, str):
        return value
    lines = []
    for message in value:
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(part.get("text", "") if part.get("type") == "text" else f"<{part.get('type')}>"
                              for part in content)
        lines.append(f"{message.get('role', '?')}: {content}")
    return "\n".join(lines)


class CompletionsLog:
    """The table of one training step's completions (kept by `keep`, shown and written by `emit`), and the
    `log_extra` columns reward functions add in between (`add_extra`). num_to_print: rows printed (a random sample,
    seeded by the step; None: all); unique_prompts: one row per distinct prompt in the printed table."""

    def __init__(self, reward_names: list[str], num_to_print: int | None = None, unique_prompts: bool = False):
        self.reward_names, self.num_to_print, self.unique_prompts = list(reward_names), num_to_print, unique_prompts
        self.pending = defaultdict(list)  # log_extra columns of the completions being scored
        self.table: dict | None = None

    def add_extra(self, column: str, values: list):
        """TRL's `log_extra(column, values)` for reward functions: one value per completion of the call."""
        self.pending[column].extend(values)

    def take_extra(self, n: int) -> dict:
        """The pending log_extra columns for n completions (a column given for fewer gets None in the rest);
        clears them."""
        out = {k: (list(v) + [None] * n)[:n] for k, v in self.pending.items()}
        self.pending.clear()
        return out

    def keep(self, prompts: list, completions: list, rewards_per_func: torch.Tensor, advantages: torch.Tensor | None,
             extra: dict):
        """The step's table: prompts and completions (N each, as the reward functions got them), rewards (N, F)
        (NaN where a function returned None), advantages (N,; None: no such column, as in on-policy distillation),
        extra columns (name -> N values)."""
        rewards = {name: rewards_per_func[:, j].tolist() for j, name in enumerate(self.reward_names)}
        self.table = {"prompt": [without_images(p) for p in prompts],
                      "completion": [without_images(c) for c in completions], **rewards, **extra}
        if advantages is not None:
            self.table["advantage"] = advantages.float().tolist()

    def emit(self, step: int, output_dir, main: bool):
        """Print the kept table and write it to output_dir/completions/completions_<step>.parquet (rank 0 only:
        main). Raises WriteError when the file cannot be written."""
        table, self.table = self.table, None
        if table is None or not main:
            return
        self._print(table, step)
        import pandas as pd

        folder = Path(output_dir) / "completions"
        path = folder / f"completions_{step:05d}.parquet"
        frame = pd.DataFrame({"step": [step] * len(table["prompt"]), **table})
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                frame.to_parquet(path)
            except (TypeError, ValueError):  # messages whose contents mix types: stored as JSON text
                for col in ("prompt", "completion"):
                    frame[col] = [v if isinstance(v, str) else json.dumps(v) for v in frame[col]]
                frame.to_parquet(path)
        except OSError as e:
            raise WriteError(f"Could not write the completions table {path}: {e}. Check that output_dir is "
                             f"writable, or set log_completions=False.") from e

    def _print(self, table: dict, step: int):
        rows = list(range(len(table["prompt"])))
        if self.unique_prompts:
            seen = set()
            rows = [i for i in rows if not (as_text(table["prompt"][i]) in seen or seen.add(as_text(table["prompt"][i])))]
        if self.num_to_print is not None and self.num_to_print < len(rows):
            rows = sorted(random.Random(step).sample(rows, self.num_to_print))
        columns = [c for c in table if c not in ("prompt", "completion")]

        def cell(col, i):
            """Row i's value of column `col` as printed: floats to 2 decimals, None blank."""
            v = table[col][i]
            return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

        try:
            from rich.console import Console
            from rich.panel import Panel
            from rich.table import Table
        except ImportError:
            print(f"--- Step {step}: completions ---", file=sys.stdout)
            for i in rows:
                values = ", ".join(f"{c}={cell(c, i)}" for c in columns)
                print(f"prompt: {as_text(table['prompt'][i])!r}\ncompletion: {as_text(table['completion'][i])!r}\n"
                      f"{values}\n", file=sys.stdout)
            return
        grid = Table(show_header=True, header_style="bold white", expand=True, show_lines=True)
        grid.add_column("Prompt", style="bright_yellow")
        grid.add_column("Completion", style="bright_green")
        for c in columns:
            grid.add_column(c.capitalize() if c == "advantage" else c, justify="right" if c != "prompt" else "left")
        for i in rows:
            grid.add_row(as_text(table["prompt"][i]), as_text(table["completion"][i]), *(cell(c, i) for c in columns))
        Console().print(Panel(grid, title=f"Step {step}", expand=False))
