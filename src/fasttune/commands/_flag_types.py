"""argparse types of the `fasttune train` flags, one per kind of config field: booleans (true/false, yes/no, on/off),
optional numbers ("none"), and the *_steps fields' whole numbers or shares of the run (0.1)."""
from __future__ import annotations

import argparse


def flag_name(name: str) -> str:
    """A config field's flag: learning_rate -> --learning-rate."""
    return "--" + name.replace("_", "-")


def parse_bool(text: str) -> bool:
    """A boolean flag's value; raises argparse.ArgumentTypeError for anything but true/false words."""
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def optional_float(text: str):
    """A float, or None for "none"."""
    return None if str(text).lower() == "none" else float(text)


def optional_int(text: str):
    """An int, or None for "none"."""
    return None if str(text).lower() == "none" else int(text)


def int_or_share(text: str):
    """--logging-steps / --eval-steps / --save-steps: a whole number, a share of the run's steps (0.1), or none."""
    if text.strip().lower() == "none":
        return None
    value = float(text)  # argparse reports a ValueError as an invalid value of the flag
    return int(value) if value.is_integer() else value


def flag_type(f):
    """argparse type of a config field, from its annotation ('int | None' -> int or 'none')."""
    kinds = {k.strip() for k in str(f.type).split("|")}
    if "list" in kinds:  # a number or a list of them (online DPO's per-epoch beta): "0.1,0.05", parsed by the config
        return str
    if "bool" in kinds:
        return bool
    if "int" in kinds and "float" in kinds:  # *_steps: a whole number, or a share of the run below 1
        return int_or_share
    if "int" in kinds:
        return optional_int if "None" in kinds else int
    if "float" in kinds:
        return optional_float if "None" in kinds else float
    return str
