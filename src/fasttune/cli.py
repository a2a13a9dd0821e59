"""`fasttune train`: the command line over the Python API. Every field of the method's config (SFTConfig, DPOConfig,
...) is a flag and a YAML key.

Precedence: built-in defaults < YAML (--config) < flags. User errors print one paragraph, no traceback
(--debug shows it), exit code 2, and leave no half-written output directory.
"""
from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from fasttune.commands._flag_types import flag_name, flag_type, parse_bool
from fasttune.commands._methods import PREFERENCE_METHODS, classifier_head, load_method, method_config
from fasttune.errors import ConfigError, FastTuneError, WriteError
from fasttune.train.config import SFTConfig, TrainingConfig

# Flags that are not config fields: model, data, LoRA and run options.
RUN_OPTIONS = {
    "model": (str, None, "model folder, .gguf file, adapter folder or hub id (default: embedded SmolLM2-135M)"),
    "data": (str, None, "dataset file (.jsonl/.json/.csv/.parquet) or save_to_disk folder (default: bundled demo)"),
    "method": (str, "sft", "training objective: sft | dpo | orpo | cpo | tpo | kto | grpo | gmpo | rloo | online_dpo | "
                           "a2po | sdft | sdpo | distillation | gkd | iw_opd | reward | classification (its config's "
                           "fields become flags)"),
    "lora_r": (int, 16, "LoRA rank"),
    "lora_alpha": (float, 16.0, "LoRA alpha"),
    "lora_dropout": (float, 0.0, "LoRA dropout"),
    "target_modules": (str, None, "comma-separated layer names (default: q,k,v,o,gate,up,down projections)"),
    "modules_to_save": (str, None, "comma-separated: embed_tokens,lm_head"),
    "use_rslora": (bool, False, "rank-stabilised LoRA scaling (alpha / sqrt(r))"),
    "use_dora": (bool, False, "DoRA: a trained magnitude per output feature on top of LoRA (slower than LoRA)"),
    "full_finetuning": (bool, False, "train all weights instead of LoRA"),
    "quantization": (str, "none", "frozen base weights: none | int4 (= nf4, QLoRA) | int8 | fp8 (FP8 matmuls, "
                                  "compute capability 8.9+)"),
    "offload_embedding": (bool, False, "keep the frozen input embedding in host memory, read row by row by the GPU "
                                       "(1-2 GiB less GPU memory for 8B-20B models with an untied LM head)"),
    "offload_lm_head": (bool, False, "keep the frozen, untied LM head in host memory, streamed to the GPU in tiles "
                                     "(1-1.6 GiB less GPU memory for 8B-14B models; ~30 ms a step for the copy)"),
    "dtype": (str, None, "float32 | bfloat16 | float16 (default: bf16 on capable GPUs, fp32 on CPU)"),
    "gradient_checkpointing": (str, "auto", "auto | true | false | offload"),
    "sample_prompt": (str, None, "prompt for the before/after sample (default: one from the data)"),
    "no_sample": (bool, False, "skip the before/after sample"),
    "resume": (str, None, "continue from a checkpoint: 'latest' (or true) for the newest in --output-dir, or a path"),
    "no_fast": (bool, False, "load through transformers + PEFT (standard speed) even if fasttune's decoder supports "
                             "the architecture; other architectures always take that path"),
    "peft": (bool, None, "LoRA adapters: the default, accepted for autotrain compatibility (--full-finetuning "
                         "trains all weights instead)"),
    "use_sharegpt_mapping": (bool, False, "accepted for autotrain compatibility: ShareGPT rows (conversations of "
                                          "from/value) are detected and mapped automatically"),
}
# Short aliases from DESIGN.md's CLI, and autotrain's names (`autotrain llm` commands run with `fasttune train`).
# autotrain's names, and the 4bit / 8bit of from_pretrained's load_in_4bit / load_in_8bit
QUANTIZATIONS = {"none": None, "int4": "nf4", "nf4": "nf4", "4bit": "nf4", "int8": "int8", "8bit": "int8",
                 "fp8": "fp8"}
ALIASES = {"epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "lr": "learning_rate", "embedding_lr": "embedding_learning_rate",
           "trainer": "method", "project_name": "output_dir", "data_path": "data"}
# autotrain's --data-path may be a folder holding the training split as train.<ext>.
DATA_FOLDER_FILES = ("train.jsonl", "train.json", "train.csv", "train.parquet")
# The demo run (no --data) uses settings that visibly learn the bundled data in about a minute on a CPU.
DEMO_DEFAULTS = {"max_steps": 30, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                 "learning_rate": 1e-3, "logging_steps": 5}
DEFAULT_OUTPUT_DIR = "fasttune_output"


def _method_config(argv: list[str]) -> type:
    """The config class of the method this `fasttune train` command asks for (flag, else YAML), so that its fields
    become flags; SFTConfig when none is given or it is unknown (resolve_settings then reports that)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", "--trainer", dest="method")
    pre.add_argument("--config")
    ns, _ = pre.parse_known_args(argv)
    method = ns.method
    if method is None and ns.config:
        try:
            import yaml

            data = yaml.safe_load(Path(ns.config).read_text()) or {}
            method = data.get("method", data.get("trainer")) if isinstance(data, dict) else None
        except Exception:  # unreadable or invalid: _load_yaml reports it with the full message
            method = None
    try:
        return method_config(str(method)) if method not in (None, "default") else SFTConfig
    except ConfigError:
        return SFTConfig


def _add_typed(parser, name: str, typ, helptext: str):
    flags = [flag_name(name)] + [flag_name(a) for a, target in ALIASES.items() if target == name]
    if typ is bool:
        parser.add_argument(*flags, dest=name, nargs="?", const=True, type=parse_bool, default=None, help=helptext)
    else:
        parser.add_argument(*flags, dest=name, type=typ, default=None, help=helptext)


class _Parser(argparse.ArgumentParser):
    """argparse that answers a mistyped flag with "did you mean" (argparse itself only lists it). Subcommand
    parsers are of this class too, so each suggests from its own flags."""

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse_known_args; exits with argparse's usage error (code 2) and a suggestion when an
        unknown `--flag` is near a known one."""
        ns, extras = super().parse_known_args(args, namespace)
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        unknown = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
        hints = []
        for name in unknown:
            hint = _did_you_mean(name[2:].replace("-", "_"), [f[2:].replace("-", "_") for f in flags], "--")
            hints += [f"{name}:{hint}" if len(unknown) > 1 else hint.strip()] if hint else []
        if hints:
            self.error(f"unrecognized arguments: {' '.join(extras)}. {' '.join(hints)}")
        return ns, extras


def build_parser(config_cls: type = SFTConfig) -> argparse.ArgumentParser:
    """The `fasttune` parser: `train` with a flag per run option and per field of `config_cls` (the method's
    config, whose defaults the help shows), plus the subcommands of fasttune/commands/."""
    parser = _Parser(prog="fasttune", description="Fine-tune LLMs fast and lean.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="fine-tune a model (no arguments: embedded model on demo data)")
    train.add_argument("--config", help="YAML file whose keys are any of these flags (flags override it)")
    train.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    train.add_argument("--gpus", type=int, default=None,
                       help="data-parallel over N local GPUs: relaunches this command under torchrun")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    for name, (typ, default, helptext) in RUN_OPTIONS.items():
        if default is not None and "default" not in helptext:
            helptext += f" (default {default!r})"
        if name == "resume":  # `--resume` alone means the latest checkpoint
            train.add_argument("--resume", nargs="?", const="latest", default=None, help=helptext)
        else:
            _add_typed(train, name, typ, helptext.replace("%", "%%"))
    resolved = config_cls()  # defaults as the config normalises them (report_to 'none' -> [])
    for f in fields(config_cls):
        _add_typed(train, f.name, flag_type(f), _default_help(config_cls, f.name, getattr(resolved, f.name)))
    train.set_defaults(func=cmd_train, config_cls=config_cls)
    for register in _more_commands():
        register(sub)
    return parser


def _default_help(config_cls: type, name: str, default) -> str:
    """A config field's flag help with the default `fasttune train` uses (as --print-config shows it): the field's
    default, the command line's own output folder, and the demo run's setting when it differs."""
    default = DEFAULT_OUTPUT_DIR if name == "output_dir" else default
    text = f"{config_cls.__name__}.{name} (default {default!r}"
    if name in DEMO_DEFAULTS and DEMO_DEFAULTS[name] != default:
        text += f"; {DEMO_DEFAULTS[name]!r} for the demo run without --data"
    return (text + ")").replace("%", "%%")


def _more_commands():
    """Other subcommands live in fasttune/commands/; each module has `register(subparsers)` that sets `func`
    (modules named _*, the commands' shared pieces, are not subcommands)."""
    import importlib
    import pkgutil

    import fasttune.commands as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}").register for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_")]


def _did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """' Did you mean ...?' from the settings and the short aliases (grad_acum -> grad_accum), or ''."""
    def spelled(n):
        """A setting's name as the user writes it here: a --flag-name with `prefix`, else the YAML key."""
        return prefix + n.replace("_", "-") if prefix else n

    # YAML keys: the aliases too; flags: `known` holds the aliases where the command has them (train)
    near = difflib.get_close_matches(name, list(known) + ([] if prefix else list(ALIASES)), n=1)
    if not near:
        return ""
    also = f" (short for {spelled(ALIASES[near[0]])})" if near[0] in ALIASES else ""
    return f" Did you mean '{spelled(near[0])}'{also}?"


def _load_yaml(path: str, config_cls: type = SFTConfig) -> dict:
    from fasttune.file_readers import read_yaml

    data = read_yaml(path) or {}  # unreadable, not UTF-8, not YAML: a ConfigError naming the file
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must be a mapping of setting: value.")
    known = list(RUN_OPTIONS) + [f.name for f in fields(config_cls)]
    out = {}
    for key, value in data.items():
        name = ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in known:
            raise ConfigError(f"{path}: unknown setting '{key}'.{_did_you_mean(name, known)}")
        out[name] = value
    return out


def resolve_settings(ns: argparse.Namespace) -> tuple[dict, TrainingConfig]:
    """(run options, the method's config). Imports only the config's module, so that a wrong setting or path
    fails before the trainers' imports (torch, datasets). Raises ConfigError for an unknown method or invalid config
    values, an unreadable --config YAML or one with unknown keys, a preference or GRPO method without --data,
    contradicting --peft / --full-finetuning, --fsdp or --quantization with --full-finetuning, or an unknown
    --quantization."""
    cls = getattr(ns, "config_cls", SFTConfig)
    values = {k: default for k, (_, default, _) in RUN_OPTIONS.items()}
    values["output_dir"] = DEFAULT_OUTPUT_DIR
    given = _load_yaml(ns.config, cls) if ns.config else {}
    given.update({k: v for k, v in vars(ns).items()
                  if v is not None and (k in values or k in cls.field_names())})
    if given.get("data") is None:
        values.update(DEMO_DEFAULTS)
    values.update(given)
    method = {"default": "sft"}.get(values["method"], values["method"])  # autotrain's generic trainer is SFT
    config_cls = method_config(method)
    config = config_cls.from_dict({k: v for k, v in values.items() if k in config_cls.field_names()}, "settings")
    run = {k: _run_option(k, values[k]) for k in RUN_OPTIONS}
    run["method"] = method  # its trainer class is imported when training starts (load_method)
    if method in PREFERENCE_METHODS and not run["data"]:
        raise ConfigError(f"--method {method} needs --data with preference rows (prompt/chosen/rejected"
                          f"{', or prompt/completion/label' if method == 'kto' else ''}); the bundled demo set is "
                          f"for SFT.")
    if method == "classification" and not run["data"]:
        raise ConfigError("--method classification needs --data with labelled rows (a `text` column and a `label` "
                          "column: class names or indices, numbers, or 0/1 lists); the bundled demo set is for SFT.")
    if method in ("grpo", "gmpo", "rloo", "online_dpo", "a2po", "sdpo") and not run["data"]:
        raise ConfigError(f"--method {method} needs --data with prompt rows (a `prompt` column, plus any columns your "
                          "reward functions read, e.g. `answer` for exact_match); the bundled demo set is for SFT.")
    if method == "sdft" and not run["data"]:
        raise ConfigError("--method sdft needs --data with rows of a `prompt` and a `privileged_context` (what the "
                          "teacher sees beside the prompt, e.g. a demonstration); the bundled demo set is for SFT.")
    if method == "distillation" and not (run["data"] and config.teacher_model_name_or_path):
        raise ConfigError("--method distillation needs --data with prompt rows (a `prompt` column) and "
                          "--teacher-model-name-or-path (the teacher's folder, .gguf file or hub id, with the "
                          "student's tokenizer); the bundled demo set is for SFT.")
    if method == "gkd" and not (run["data"] and config.teacher_model_name_or_path):
        raise ConfigError("--method gkd needs --data with conversations (a `messages` column ending with the "
                          "assistant's turn, or `prompt` and `completion`) and --teacher-model-name-or-path (the "
                          "teacher's folder, .gguf file or hub id, with the student's tokenizer).")
    if method == "iw_opd" and not (run["data"] and config.teacher_model_name_or_path):
        raise ConfigError("--method iw_opd needs --data with conversations (a `messages` column; with --lmbda 1, the "
                          "default, it may end with the user's turn) and --teacher-model-name-or-path (the teacher's "
                          "folder, .gguf file or hub id, with the student's tokenizer).")
    run["data"] = _data_file(run["data"])
    if run["peft"] is False and not run["full_finetuning"]:
        raise ConfigError("--peft false: fasttune trains LoRA adapters unless --full-finetuning is given; pass "
                          "--full-finetuning to train all weights.")
    if run["peft"] and run["full_finetuning"]:
        raise ConfigError("--peft and --full-finetuning contradict each other: choose LoRA (--peft) or training all "
                          "weights (--full-finetuning).")
    if getattr(config, "fsdp", False) and run["full_finetuning"]:
        raise ConfigError("--fsdp with --full-finetuning is not supported by the command line yet (the merged model "
                          "cannot be written from shards). Train LoRA adapters with --fsdp, or drop --fsdp.")
    run["quantization"] = str(run["quantization"]).lower()
    if run["quantization"] not in QUANTIZATIONS:
        raise ConfigError(f"--quantization {run['quantization']} is not understood: use none, int4 (NF4, QLoRA), "
                          f"int8 or fp8.")
    if run["quantization"] != "none" and run["full_finetuning"]:
        raise ConfigError(f"--quantization {run['quantization']} freezes the base weights, so it cannot be combined "
                          f"with --full-finetuning; train LoRA adapters instead (drop --full-finetuning).")
    return run, config


# Run options that the command line takes as comma-separated text and YAML also as a list.
LIST_OPTIONS = ("target_modules", "modules_to_save")


def _run_option(name: str, value):
    """A run option's value as its flag would give it: YAML lists of names become comma-separated text, YAML
    scalars of text options text, numbers written as text ('5e-2') numbers; other types raise ConfigError."""
    from fasttune.train.config import _checked_type

    typ, default, _ = RUN_OPTIONS[name]
    if typ is str and isinstance(value, (list, tuple)) and name in LIST_OPTIONS:
        if not all(isinstance(v, str) and v.strip() and "," not in v for v in value):
            raise ConfigError(f"{name}={list(value)!r} is invalid: give layer names, as a list ([q_proj, v_proj]) or "
                              f"as comma-separated text (q_proj,v_proj).")
        return ",".join(v.strip() for v in value)
    if name == "resume" and value is False:
        return None
    if typ is str and isinstance(value, (bool, int, float)):  # YAML's `gradient_checkpointing: false`, `model: 7`
        return str(value).lower() if isinstance(value, bool) else str(value)
    return _checked_type(name, typ.__name__ + (" | None" if default is None else ""), value)


RUN_RECORD = "fasttune_run.json"  # beside the adapter: what `fasttune export --imatrix` measures on by default


def _record_run(out: Path, method: str, data: str):
    """Write out/fasttune_run.json: the method and the training data (an absolute path when it is a local one).
    Raises WriteError (a ConfigError) when the file cannot be written."""
    import json

    from fasttune.errors import write_error

    local = Path(data).expanduser()
    try:
        (out / RUN_RECORD).write_text(json.dumps({"method": method,
                                                  "data": str(local.resolve()) if local.exists() else data}, indent=1))
    except OSError as e:
        raise write_error(e, "the run record", out / RUN_RECORD) from None


def _data_file(data):
    """A folder that is not a save_to_disk dataset but holds train.jsonl/.json/.csv/.parquet means that file."""
    if not data or not Path(data).is_dir():
        return data
    folder = Path(data)
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        return data
    found = [folder / f for f in DATA_FOLDER_FILES if (folder / f).is_file()]
    return str(found[0]) if found else data


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _relaunch_under_torchrun(n: int, argv: list[str]) -> int:
    """`fasttune train --gpus N ...` = `torchrun --standalone --nproc-per-node N -m fasttune.cli train ...`."""
    import os
    import subprocess

    if n < 1:
        raise ConfigError(f"--gpus {n} is invalid: give the number of GPUs to use (>= 1).")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--gpus is for launching; this process already runs under torchrun. Drop --gpus.")
    rest, skip = [], False
    for a in argv:  # the same command without --gpus
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "fasttune.cli", *rest]
    return subprocess.call(cmd)


def cmd_train(ns) -> int:
    """`fasttune train`: resolve the settings, check the data path and output folder (before the slow imports),
    train, and write the adapter (or model), log and plot. Returns the exit code (0, or 130 when interrupted);
    raises FastTuneError for user errors (main prints them)."""
    if ns.gpus is not None:
        return _relaunch_under_torchrun(ns.gpus, ns.argv)
    run, config = resolve_settings(ns)
    if ns.print_config:
        import yaml

        shown = dict(run)
        print(yaml.safe_dump({**shown, **{f.name: getattr(config, f.name) for f in fields(config)}}, sort_keys=False))
        return 0
    if run["data"]:  # a mistyped path fails here, before datasets' and torch's imports (seconds)
        from fasttune.data.paths import check_local_source

        check_local_source(run["data"])
    out = Path(config.output_dir)
    _check_output_dir(out, _resume_value(run["resume"]), config.overwrite_output_dir)
    created = not out.exists()
    try:
        return _train(run, config, out)
    except BaseException:
        # No half-written output directory: remove what this run created, unless it saved a checkpoint to resume
        # or the trained adapter / model (moved into place only when complete; a later file failed).
        if created and out.exists() and not any(out.glob("checkpoint-*")) and not _trained_output(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _trained_output(out: Path) -> bool:
    """Whether `out` holds a complete trained adapter or model (atomic_folder moves them in only when whole)."""
    return (out / "adapter" / "adapter_config.json").exists() or (out / "model" / "config.json").exists()


def _resume_value(resume):
    """--resume's text as resume_from_checkpoint takes it: True for the latest checkpoint, else a path or None."""
    if resume is not None and str(resume).lower() in ("latest", "true", "1", "yes"):
        return True
    return resume


def _check_output_dir(out: Path, resume=None, overwrite: bool = False) -> None:
    """--output-dir must be a folder or creatable as one, checked before anything slow runs (nothing is created);
    --resume must find its checkpoint, and a new run must not land among another run's checkpoints
    (train/run_folder.py)."""
    import os

    from fasttune.train.run_folder import check_new_run

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir '{out}' is a file; pass a folder (it is created if missing).")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir '{out}' cannot be created: '{existing}' is a file, not a folder. Pass a "
                          f"folder path (it is created if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir '{out}': no permission to write in '{existing}'. Choose a location you can "
                          f"write to.")
    check_new_run(out, resume, overwrite)


def _check_data(run: dict, config: TrainingConfig, data: str):
    """The rows of the training data, read before the model loads, so that a missing or unreadable file (and, for
    SFT, rows of no known layout) fails in a moment rather than after the model load. Raises DataError."""
    from fasttune.data import load_rows
    from fasttune.data.formats import detect_format
    from fasttune.data.sources import source_name

    rows = load_rows(data)
    if run["method"] == "sft":
        detect_format(rows.column_names, config.data_format, dataset_text_field=config.dataset_text_field,
                      source_name=source_name(data))
    return rows


def _check_flags(run: dict):
    """Run options checked before the model loads; returns the gradient checkpointing mode."""
    import torch

    from fasttune.api import CHECKPOINTING_MODES, resolve_dtype

    if run["dtype"] is not None:
        resolve_dtype(run["dtype"], torch.device("cpu"))  # ConfigError for a name it does not know
    gc = {"true": True, "false": False}.get(str(run["gradient_checkpointing"]).lower(), run["gradient_checkpointing"])
    if gc not in CHECKPOINTING_MODES:
        raise ConfigError(f"--gradient-checkpointing {run['gradient_checkpointing']} is not understood; use one of "
                          f"auto, true, false, offload.")
    return gc


def _train(run: dict, config: TrainingConfig, out: Path):
    from fasttune.data import demo_dataset_path, demo_sample_prompt

    data = run["data"] or str(demo_dataset_path())
    if not run["data"]:
        print(f"fasttune: no --data given; training on the bundled demo set ({data}).")
    rows = _check_data(run, config, data)  # data and flags first: their errors need no model (nor its imports)
    gc = _check_flags(run)
    from fasttune import FastLanguageModel
    from fasttune.commands._common import QUANTIZATION_NAMES
    from fasttune.models.fallback import FallbackWarning
    from fasttune.plot import plot_losses
    from fasttune.wording import plural

    head = classifier_head(run["method"], rows, config, data)  # {} for the language-model methods
    if head:
        run["no_sample"] = True  # a classifier scores text; it does not write any
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        model, tok = FastLanguageModel.from_pretrained(run["model"] or "", max_seq_length=config.max_seq_length,
                                                       dtype=run["dtype"], full_finetuning=run["full_finetuning"],
                                                       fast=not run["no_fast"],
                                                       load_in_4bit=QUANTIZATIONS[run["quantization"]] == "nf4",
                                                       load_in_8bit=QUANTIZATIONS[run["quantization"]] == "int8",
                                                       load_in_fp8=QUANTIZATIONS[run["quantization"]] == "fp8",
                                                       offload_embedding=run["offload_embedding"],
                                                       offload_lm_head=run["offload_lm_head"],
                                                       fsdp=bool(getattr(config, "fsdp", False)), **head)
    for w in caught:  # the fallback notice as one line of our own; other warnings as Python shows them
        if issubclass(w.category, FallbackWarning):
            print(f"fasttune: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if tok is None:
        raise ConfigError(f"The model at '{run['model']}' has no tokenizer; save one beside the weights.")
    quant = QUANTIZATIONS[run["quantization"]]
    print(f"fasttune: model {model.name_or_path} ({model.hf_config.model_type}, {model.dtype}, {model.device}"
          f"{', ' + QUANTIZATION_NAMES[quant] + ' frozen weights' if quant else ''})")
    fresh_lora = not run["full_finetuning"] and model.lora_settings is None  # zero updates until trained
    if fresh_lora:
        model = FastLanguageModel.get_peft_model(
            model, r=run["lora_r"], lora_alpha=run["lora_alpha"], lora_dropout=run["lora_dropout"],
            target_modules=_csv(run["target_modules"]), modules_to_save=_csv(run["modules_to_save"]),
            use_rslora=run["use_rslora"], use_dora=run["use_dora"], use_gradient_checkpointing=gc,
            random_state=config.seed)
    trainer = load_method(run["method"])[0](model=model, tokenizer=tok, train_dataset=data, args=config)
    prompt = run["sample_prompt"] or (_first_prompt(rows) if run["data"] else demo_sample_prompt())
    image_dir = Path(run["data"]).expanduser().resolve().parent if run["data"] else None
    if not run["no_sample"] and prompt:
        print(f"\nSample before training\n  prompt: {_preview(prompt)}\n  reply:  "
              f"{_sample(model, tok, prompt, image_dir, base_only=fresh_lora)}\n")
    metrics = trainer.train(resume_from_checkpoint=_resume_value(run["resume"]))
    if metrics["interrupted"]:
        return 130  # the trainer printed where the checkpoint is and how to resume
    target = out / ("model" if run["full_finetuning"] else "adapter")
    if config.fsdp:  # sharded weights: every rank joins the gather, rank 0 writes
        model.save_pretrained(target, tok)
    if not trainer.dist.is_main:
        return 0  # under torchrun, rank 0 writes the adapter, plot and samples
    if not run["no_sample"] and prompt and not config.fsdp:  # generation would need all ranks in step
        print(f"\nSample after training\n  prompt: {_preview(prompt)}\n  reply:  "
              f"{_sample(model, tok, prompt, image_dir)}\n")
    if not config.fsdp:
        model.save_pretrained(target, tok)  # adapter (or full model) plus the tokenizer
    try:
        _record_run(out, run["method"], data)
        plot = plot_losses(trainer.log_history, out / "loss.png")
    except WriteError as e:  # the trained weights are saved: say so, so nobody trains again for a plot
        raise WriteError(f"{e} The trained {target.name} itself is complete in '{target}'.", e.os_error) from None
    first, last = metrics.get("first_step_loss"), metrics.get("last_step_loss")  # this run's first and last step
    loss = f", loss {first:.3f} -> {last:.3f}" if first is not None else ""
    accuracy = next((h["accuracy"] for h in reversed(trainer.log_history) if "accuracy" in h), None)
    if accuracy is not None:  # a classifier's or reward model's last logged accuracy
        loss += f", accuracy {accuracy:.3f} (last logged steps)"
    print(f"fasttune: {plural(metrics['global_step'], 'step')} in {metrics['train_runtime']:.0f}s{loss}, "
          f"{metrics['train_tokens_per_second']:,.0f} tokens/s")
    print(f"fasttune: saved {target} (load with FastLanguageModel.from_pretrained('{target}')), log "
          f"{out / 'log_history.jsonl'}, plot {plot}")
    return 0


def _sample(model, tok, prompt, image_dir=None, base_only: bool = False) -> str:
    """The model's greedy reply to `prompt` (a string, or a vision-language row's content list with images).
    base_only: the LoRA layers were just created (B = 0, so they add nothing): decode with them switched off,
    the same reply without their extra GEMMs per layer and token (the demo's sample before training)."""
    from fasttune.generate import generate_text
    from fasttune.models.fallback import FallbackModel

    if isinstance(model, FallbackModel):
        return model.sample_text(tok, prompt)
    if base_only:
        from fasttune.peft.lora import set_adapters_enabled

        set_adapters_enabled(model, False)
        try:
            return _sample(model, tok, prompt, image_dir)
        finally:
            set_adapters_enabled(model, True)
    if getattr(model, "family", None) is not None:
        from fasttune.generate import generate_vision_text

        return generate_vision_text(model, tok, [prompt], image_dir)[0]
    return generate_text(model, tok, prompt)


def _preview(prompt) -> str:
    from fasttune.data.vision_rows import content_preview

    return content_preview(prompt)


def _first_prompt(rows) -> str | None:
    """A user prompt from the first row, for the before/after sample."""
    row = rows[0]
    for key in ("messages", "conversations"):
        for m in row.get(key) or []:
            if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"):
                return m.get("content", m.get("value"))
    prompt = row.get("instruction") or row.get("prompt")
    if isinstance(prompt, list):  # conversational preference / GRPO rows: the last user message
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    return prompt if isinstance(prompt, str) else None


def main(argv=None) -> int:
    """The console script: parse `argv` (default sys.argv[1:]) and run the subcommand. Returns the exit code: 0,
    2 for a user error (one paragraph on stderr, no traceback unless --debug), 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_method_config(argv) if argv[:1] == ["train"] else SFTConfig)
    ns = parser.parse_args(argv)
    ns.argv = argv
    if not hasattr(ns, "debug"):
        ns.debug = False
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        return ns.func(ns)
    except FastTuneError as e:
        _note_distributed_failure()
        if ns.debug:
            raise
        message = str(e)
        if ns.command == "export":  # the API's way out, in the command line's words
            message = message.replace("with save_pretrained_merged", "with --format merged (save_pretrained_merged)")
        elif ns.command == "train":  # a config field named as the API does: its flag first
            message = re.sub(r"\b([A-Z][A-Za-z]*Config)\.([a-z][a-z0-9_]*)\b",
                             lambda m: f"--{m[2].replace('_', '-')} ({m[1]}.{m[2]})", message)
        print(f"fasttune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _note_distributed_failure()
        print("fasttune: interrupted.", file=sys.stderr)
        return 130


def _note_distributed_failure():
    """Under torchrun, skip the exit barrier (peers may still be training); a no-op when never distributed."""
    distributed = sys.modules.get("fasttune.train.distributed")  # loaded only if training started
    if distributed is not None:
        distributed.note_failure()


if __name__ == "__main__":
    sys.exit(main())
