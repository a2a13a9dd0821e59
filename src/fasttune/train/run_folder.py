"""The output folder of a training run: its checkpoint-N folders, which one to resume, and the checks a new run
makes before it writes there. Path work only (no torch), so the command line runs these checks before its slow
imports."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from fasttune.atomic import remove_leftovers
from fasttune.errors import ConfigError

STATE_NAME = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path, complete: bool = True) -> list[Path]:
    """checkpoint-N folders, oldest first; with complete=True only those whose trainer_state.json exists."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if not complete or (p / STATE_NAME).exists()]


def resolve_resume(resume, output_dir: Path) -> Path | None:
    """The checkpoint folder a `resume_from_checkpoint` value names: None/False -> None; True -> the newest complete
    checkpoint in output_dir; a path -> that checkpoint. Raises ConfigError when there is none."""
    if resume in (None, False):
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume_from_checkpoint=True but '{output_dir}' holds no complete checkpoint "
                              f"(checkpoint-N with {STATE_NAME}). Train with save_steps > 0 first.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).exists():
        raise ConfigError(f"'{path}' is not a complete fasttune checkpoint (no {STATE_NAME}). Pass a "
                          f"checkpoint-N folder, or True for the latest one in output_dir.")
    return path


def prepare_output_dir(output_dir: Path, resume, overwrite: bool = False) -> list[Path]:
    """Before a run: remove temporary folders a killed save left behind, and refuse a new (not resumed) run into
    a folder holding another run's checkpoints, which it would otherwise mix with its own (resume=True would pick
    the newest of either, save_total_limit would delete the wrong ones). overwrite=True deletes those checkpoints
    instead. Returns the checkpoints deleted. Raises ConfigError."""
    output_dir = Path(output_dir)
    remove_leftovers(output_dir, ".checkpoint-*.tmp-*")
    found = check_new_run(output_dir, resume, overwrite)
    for p in found:
        shutil.rmtree(p)
    return found


def check_new_run(output_dir: Path, resume, overwrite: bool = False) -> list[Path]:
    """The checks of `prepare_output_dir` without changing anything: a resume must find its checkpoint (see
    `resolve_resume`), and a new run refuses another run's checkpoints unless `overwrite`. Returns the checkpoint
    folders a new run with overwrite=True would delete. Raises ConfigError."""
    output_dir = Path(output_dir)
    if resume not in (None, False):
        resolve_resume(resume, output_dir)
        return []
    found = list_checkpoints(output_dir, complete=False)  # a half-written one is another run's too
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"'{output_dir}' already holds checkpoints of an earlier run ({names}). Continue that run "
                          f"with resume_from_checkpoint=True (CLI: --resume), choose another output_dir, or set "
                          f"overwrite_output_dir=True (CLI: --overwrite-output-dir) to delete them first.")
    return found
