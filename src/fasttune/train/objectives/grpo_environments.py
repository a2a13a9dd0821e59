"""GRPO's environments: TRL 1.16's `GRPOTrainer(environment_factory=...)` (experimental there), on the tool loop of
grpo_tools.py.

An environment is an object made by a factory (a callable without arguments). Its public methods (other than `reset`
and `get_reward`) are tools the model may call during a rollout, with the same rules as `tools=` (type hints and a
docstring give their schemas); each rollout (one completion) gets its own instance, drawn from a pool that keeps
instances across steps and grows only when a batch needs more at once (TRL's "construct once, reset often").
Before sampling, `reset(**row)` is called with the example's dataset row; a string it returns is appended to the
prompt's last message. When the class defines `get_reward()`, it scores each finished rollout from the instance's
state: one more reward function, named after the class, weight 1 (after the given reward functions' weights), as in
TRL. Reward functions also get `environments`, the rollouts' instances in completion order.

A dict {name: factory} mixes environments: each row names its own in an `environment` column, and only that
environment's tools are rendered in its prompt (and callable in its rollouts). With one factory a dataset is optional:
rows of an empty user message stand in (reset() supplies the task), and max_steps sets the length.
"""
from __future__ import annotations

import inspect

from fasttune.errors import ConfigError, DataError


def _reward_of(env_type: type):
    """TRL's reward source of an environment class with get_reward: f(environments, **_) -> [e.get_reward() for the
    rollouts whose instance is exactly of env_type, None for the others], named after the class."""
    if inspect.iscoroutinefunction(env_type.get_reward):
        async def get_reward(environments, **_):
            """environments: each completion's instance -> their get_reward() (None for other classes')."""
            return [await e.get_reward() if type(e) is env_type else None for e in environments]
    else:
        def get_reward(environments, **_):
            """environments: each completion's instance -> their get_reward() (None for other classes')."""
            return [e.get_reward() if type(e) is env_type else None for e in environments]
    get_reward.__name__ = env_type.__name__
    return get_reward


def environment_tools(instance) -> list:
    """The tools an environment instance offers: its class's public functions other than reset and get_reward, bound
    to the instance."""
    return [getattr(instance, n) for n, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if n not in ("reset", "get_reward") and not n.startswith("_")]


class Environments:
    """The environments of a GRPO run (module docstring).

    factory: a callable that returns an environment instance, or a dict {name: such a callable}. standalone: the
    trainer's `tools=`, offered beside every environment's own. trainer_name: for messages.

    Attributes: multi (a dict was given), standalone (the trainer's tools), tools ({name: standalone + the tools of
    the instance made to check the class, whose schemas the prompts render}; the single factory's name is None),
    reward_funcs (one per class with get_reward). Raises ConfigError for a factory that is not callable or an instance
    without a callable reset."""

    def __init__(self, factory, standalone: list, trainer_name: str):
        self.multi = isinstance(factory, dict)
        self.factories = dict(factory) if self.multi else {None: factory}
        self.standalone, self.tools, self.pool, self.reward_funcs = list(standalone), {}, {}, []
        rewarded = []
        for name, make in self.factories.items():
            label = "environment_factory" + (f"[{name!r}]" if self.multi else "")
            if not callable(make):
                raise ConfigError(f"{trainer_name}: {label} is not callable; give a class or function that returns a "
                                  f"new environment.")
            instance = make()  # (kept: the first instance of the pool)
            if not callable(getattr(type(instance), "reset", None)):
                raise ConfigError(f"{trainer_name}: {label} made a {type(instance).__name__}, which has no reset() "
                                  f"method; every environment needs one (it may return None, or a string appended to "
                                  f"the prompt).")
            self.tools[name] = list(standalone) + environment_tools(instance)
            self.pool[name] = [instance]
            if callable(getattr(type(instance), "get_reward", None)) and type(instance) not in rewarded:
                rewarded.append(type(instance))
                self.reward_funcs.append(_reward_of(type(instance)))

    @property
    def all_tools(self) -> list:
        """Every environment's tools and the standalone ones, each once (for the checks of grpo_tools.ToolCalls)."""
        out = []
        for tools in self.tools.values():
            out += [t for t in tools if not any(t.__name__ == o.__name__ for o in out)]
        return out

    def name_of(self, row: dict, where: str):
        """The environment a dataset row uses: its `environment` field with several environments, else None. Raises
        DataError naming the row when the field is missing or names none of them."""
        if not self.multi:
            return None
        name = row.get("environment")
        if name not in self.factories:
            raise DataError(f"{where}: field 'environment' is {name!r}, which is not among the environments given to "
                            f"environment_factory ({', '.join(map(repr, self.factories))}). Name one of them.")
        return name

    def reset_kwargs(self, row: dict) -> dict:
        """The keyword arguments reset() gets for a row: the row's fields (without `environment`, the routing field,
        when there are several environments), as TRL passes them."""
        return {k: v for k, v in row.items() if not (self.multi and k == "environment")}

    def draw(self, names: list) -> list:
        """One instance per rollout, for each rollout's environment name: the pool's instances in order, new ones made
        when a batch needs more of an environment than the pool holds."""
        handed, out = {}, []
        for name in names:
            pool, i = self.pool[name], handed.get(name, 0)
            if i == len(pool):
                pool.append(self.factories[name]())
            handed[name] = i + 1
            out.append(pool[i])
        return out


def with_observation(prompt: list[dict], observation, where: str) -> list[dict]:
    """prompt (a message list) with reset()'s string `observation` appended to its last message's content (None:
    the prompt as it is). Raises DataError for an observation that is not a string (images from an environment are
    not implemented) or a last message whose content is not a string."""
    if observation is None:
        return prompt
    content = prompt[-1]["content"]
    if not isinstance(observation, str) or not isinstance(content, str):
        raise DataError(f"{where}: reset() returned {type(observation).__name__} for a prompt whose last message "
                        f"holds {type(content).__name__}; text models take a string observation appended to a string "
                        f"message.")
    return prompt[:-1] + [{**prompt[-1], "content": content + observation}]


def reset_rollouts(trainer, examples: list[dict]) -> tuple[list[dict], list, list]:
    """Before a rollout is sampled: an instance per example (per completion) drawn from the pool and reset with its
    row; a returned observation joins the prompt, which is then encoded again with its environment's tools.

    trainer: the GRPOTrainer (its `environments`, `tool_calls`, `tokenizer`); examples: the rollout's prepared
    examples (each with `environment`, `row` and `where`, grpo.py's prepare). Returns (the examples to sample, new
    dicts where an observation changed the prompt; the instances; per example (the tools its rollout may call: the
    standalone ones and its instance's, the tools whose schemas its prompt shows)). Raises DataError as
    with_observation."""
    from fasttune.data.prompts import encode_prompt

    envs, tc = trainer.environments, trainer.tool_calls
    instances = envs.draw([ex["environment"] for ex in examples])
    out, row_tools = [], []
    for ex, instance in zip(examples, instances):
        schemas = envs.tools[ex["environment"]]
        row_tools.append((envs.standalone + environment_tools(instance), schemas))
        observation = instance.reset(**ex["row"])
        if observation is None:
            out.append(ex)
            continue
        prompt = with_observation(ex["prompt"], observation, ex["where"])
        prompt, ids = encode_prompt(prompt, trainer.tokenizer, ex["where"], **tc.prompt_kwargs(schemas))
        out.append({**ex, "prompt": prompt, "prompt_ids": ids, "input_ids": ids})
    return out, instances, row_tools
