"""GRPO with the user's own rollout: TRL 1.16's `GRPOTrainer(rollout_func=...)` (experimental there).

rollout_func(prompts, trainer) gets the prompts of this process's share of a rollout (as the dataset holds them, one
entry per completion: a group's prompt repeated num_generations times) and the trainer, and returns a dict with
`prompt_ids` and `completion_ids` (lists of token ids, one per prompt) and `logprobs`. Those tokens are trained
instead of sampled ones; `env_mask` (per completion, 1 for the model's tokens and 0 for tokens the rollout inserted,
e.g. a simulated user's turns) keeps the inserted tokens out of the loss as tool results are; every other key is
handed to the reward functions (a list: its entry for each completion; anything else: as it is), as TRL merges them
into the inputs. `logprobs` (the sampler's, for vLLM's importance-sampling correction in TRL) are not used: the
trainer scores the completions itself.
"""
from __future__ import annotations

import copy

from fasttune.errors import ConfigError
from fasttune.train.objectives.grpo_tools import ToolTurns

REQUIRED = ("prompt_ids", "completion_ids", "logprobs")


def custom_rollout(trainer, examples: list[dict]) -> tuple[list[dict], list[list[int]], ToolTurns]:
    """Run trainer.rollout_func on the examples' prompts (copies: the function may change them).

    Returns (the examples with the returned prompt ids and the extra fields among their columns, the completion ids,
    a ToolTurns holding env_mask (all ones without it) and no messages). Raises ConfigError for a result that is not
    a dict, misses a required key, or whose lists do not hold one entry per prompt (of non-empty token ids)."""
    n = len(examples)
    output = trainer.rollout_func([copy.deepcopy(ex["prompt"]) for ex in examples], trainer)
    if not isinstance(output, dict):
        raise ConfigError(f"rollout_func returned {type(output).__name__}; return a dict with "
                          f"{', '.join(REQUIRED)} (and optional env_mask and fields for the reward functions).")
    missing = [k for k in REQUIRED if k not in output]
    if missing:
        raise ConfigError(f"rollout_func must return keys {missing} in its output dict (it returned "
                          f"{sorted(output)}).")
    extra = {k: v for k, v in output.items() if k not in REQUIRED}
    masks = extra.pop("env_mask", None)
    prompts, completions = output["prompt_ids"], output["completion_ids"]
    for name, values in (("prompt_ids", prompts), ("completion_ids", completions), ("env_mask", masks)):
        if values is not None and len(values) != n:
            raise ConfigError(f"rollout_func returned {len(values)} {name} for {n} prompts; return one per prompt "
                              f"(the prompts repeat num_generations times, one per completion).")
    if not all(len(p) for p in prompts) or not all(len(c) for c in completions):
        raise ConfigError("rollout_func returned an empty prompt_ids or completion_ids entry; each needs tokens.")
    masks = [list(m) for m in masks] if masks is not None else [[1] * len(c) for c in completions]
    if any(len(m) != len(c) for m, c in zip(masks, completions)):
        raise ConfigError("rollout_func's env_mask entries must be as long as their completion_ids entries.")
    out = []
    for i, ex in enumerate(examples):
        fields = {k: (v[i] if isinstance(v, list) else v) for k, v in extra.items()}
        ids = [int(t) for t in prompts[i]]
        out.append({**ex, "prompt_ids": ids, "input_ids": ids, "columns": {**ex["columns"], **fields}})
    completion_ids = [[int(t) for t in c] for c in completions]
    return out, completion_ids, ToolTurns(completion_ids, masks, None)
