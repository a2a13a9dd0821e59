"""Reward functions for GRPO: the calling convention (TRL's) and the built-ins usable by name from the CLI/YAML.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, one value per completion.
`prompts`/`completions` are strings, or message lists when the dataset's prompts are conversations (a completion is
then `[{"role": "assistant", "content": text}]`); `columns` holds every other dataset column (one value per
completion) plus `completion_ids` and, as TRL passes them, `trainer_state` (transformers' TrainerState: global_step,
max_steps, ...), `log_metric(name, value)` (averaged into the next log entry) and `log_extra(column, values)`
(accepted; fasttune keeps no table of completions). None means "not applicable" (TRL: NaN, ignored in the group
statistics). An `async def` reward function (or an object with an async __call__) is awaited; several run
concurrently on one event loop kept for the process (run_async), as TRL runs them.

Built-in names:
- `exact_match`: 1.0 when the completion text (stripped) equals the row's `answer` column (stripped), else 0.0.
- `regex:<pattern>`: 1.0 when `re.search(pattern, completion)` matches, else 0.0 (anchor with ^...$ yourself).
- `length` / `length:<n>`: prefers short completions: 1 - tokens / n (floored at 0); n defaults to
  max_completion_length.
- `model:<folder>`: a reward model saved in that folder (a sequence classifier: one trained with RewardTrainer or
  `fasttune train --method reward`, or a transformers *ForSequenceClassification checkpoint) with its tokenizer,
  loaded by GRPOTrainer on the policy's device and scored as train/reward_models.py describes.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fasttune.errors import ConfigError
from fasttune.train.imports import import_callables, is_import_spec

BUILTIN_NAMES = ("exact_match", "regex:<pattern>", "length", "length:<n>", "model:<folder>")


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


class ExactMatch:
    """1.0 when the stripped completion equals the stripped `answer` column."""
    __name__ = "exact_match"
    needs_columns = ("answer",)

    def __call__(self, prompts, completions, answer, **_) -> list[float]:
        return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


class RegexMatch:
    """1.0 when the pattern is found in the completion (re.search, DOTALL), else 0.0."""
    needs_columns = ()

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.regex = re.compile(pattern, re.DOTALL)
        self.__name__ = f"regex:{pattern}"

    def __call__(self, prompts, completions, **_) -> list[float]:
        return [float(self.regex.search(completion_text(c)) is not None) for c in completions]


class LengthReward:
    """Prefers short completions: 1 - n_tokens / limit, floored at 0."""
    needs_columns = ()

    def __init__(self, limit: int | None, name: str = "length"):
        self.limit = limit
        self.__name__ = name

    def __call__(self, prompts, completions, completion_ids, **_) -> list[float]:
        return [max(0.0, 1.0 - len(ids) / self.limit) for ids in completion_ids]


class RewardModelFolder:
    """`model:<folder>` before GRPOTrainer loads it (train/reward_models.load_reward_model): the name checks the
    folder without loading a model when a config is validated."""

    needs_columns = ()

    def __init__(self, folder: Path):
        self.folder = folder
        # fasttune's run folders hold the weights in adapter/ or model/: the run's name says more
        self.__name__ = folder.parent.name if folder.name in ("adapter", "model") else folder.name

    def __call__(self, *args, **kwargs):
        raise ConfigError(f"The reward model in '{self.folder}' is loaded by GRPOTrainer; call the trainer's own "
                          f"reward function instead.")


def builtin_reward(spec: str, max_completion_length: int, field: str = "reward_funcs") -> Callable:
    """A built-in reward function from its name, or the user's function from an import spec (train/imports.py:
    package.module.function or path/to/file.py:function); a ConfigError naming `field` for unknown names, bad
    patterns, a `model:` folder that does not exist, or a spec that does not import a callable."""
    if spec.startswith("model:"):
        folder = Path(spec[len("model:"):].strip()).expanduser()
        if not str(folder) or not folder.is_dir():
            raise ConfigError(f"{field}: '{spec}' names no folder; write model:<folder> with the folder of a saved "
                              f"reward model (e.g. the output of `fasttune train --method reward`).")
        return RewardModelFolder(folder.resolve())
    if spec == "exact_match":
        return ExactMatch()
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        if not pattern:
            raise ConfigError(f"{field}: 'regex:' needs a pattern after the colon, e.g. 'regex:^Answer: \\d+$'.")
        try:
            return RegexMatch(pattern)
        except re.error as e:
            raise ConfigError(f"{field}: the pattern in '{spec}' is not a valid regular expression ({e}). "
                              f"Fix the pattern (Python `re` syntax).") from None
    if spec == "length" or spec.startswith("length:"):
        limit = max_completion_length
        if spec != "length":
            try:
                limit = int(spec[len("length:"):])
            except ValueError:
                limit = 0
            if limit < 1:
                raise ConfigError(f"{field}: '{spec}' is invalid: write length:<n> with a whole number n >= 1 "
                                  f"(tokens), or plain 'length' for max_completion_length.")
        return LengthReward(limit, spec)
    if is_import_spec(spec):  # the user's own function, as TRL's command line takes one
        return import_callables([spec], field)[0]
    raise ConfigError(f"{field}: unknown reward function '{spec}'. Built-in names: {', '.join(BUILTIN_NAMES)}; "
                      f"your own as package.module.function or path/to/file.py:function; or pass Python callables "
                      f"f(prompts, completions, **columns) -> list[float] to GRPOTrainer(reward_funcs=...).")


def split_specs(text: str) -> list[str]:
    """'exact_match,length,regex:^a,b$' -> specs. A `regex:` spec takes the rest of the text, commas included."""
    specs, rest = [], text
    while rest:
        rest = rest.lstrip()
        if rest.startswith("regex:"):
            specs.append(rest)
            break
        head, _, rest = rest.partition(",")
        if head.strip():
            specs.append(head.strip())
    return specs


def resolve_reward_funcs(funcs, max_completion_length: int, field: str = "reward_funcs") -> list[Callable]:
    """Names and/or callables -> callables. A list item is one name; a plain string may hold several,
    comma-separated (see split_specs)."""
    if funcs is None or (isinstance(funcs, (str, list, tuple)) and not funcs):
        raise ConfigError(f"GRPO needs at least one reward function: set {field} to built-in names such as "
                          f"['exact_match'] or pass callables f(prompts, completions, **columns) -> list[float].")
    if isinstance(funcs, str):
        items = split_specs(funcs)
    else:
        items = list(funcs) if isinstance(funcs, Sequence) else [funcs]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(builtin_reward(item.strip(), max_completion_length, field))
        elif callable(item):
            out.append(item)
        else:
            raise ConfigError(f"{field}: {item!r} is neither a built-in name nor a callable.")
    return out


def required_columns(func) -> tuple[str, ...]:
    """Dataset columns a reward function needs: `needs_columns` of the built-ins, else the keyword parameters of
    its signature without defaults (so a missing column is a DataError naming the row, not a TypeError later)."""
    if hasattr(func, "needs_columns"):
        return tuple(func.needs_columns)
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return ()
    own = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra", "environments")
    return tuple(p.name for p in params if p.default is p.empty and p.name not in own
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def reward_name(func) -> str:
    """The name metrics and messages use for a reward function: its __name__, else its class name."""
    return getattr(func, "__name__", None) or type(func).__name__


def is_async_callable(func) -> bool:
    """Whether calling `func` returns a coroutine: an `async def` function, a functools.partial of one, or an
    object whose __call__ is one (TRL's rule)."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def run_async(coroutines: list) -> list:
    """The results of `coroutines`, run concurrently (asyncio.gather) on one event loop in a background thread kept
    for the process, so that clients an async reward function keeps (HTTP sessions bound to a loop) work from step to
    step, as TRL runs them. Exceptions propagate."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="fasttune-rewards", daemon=True).start()

    async def gather():
        return await asyncio.gather(*coroutines)

    return asyncio.run_coroutine_threadsafe(gather(), _LOOP).result()
