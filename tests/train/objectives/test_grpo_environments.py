"""GRPO with environments (TRL's environment_factory, grpo_environments.py): TRL's GRPOTrainer on a PEFT twin is the
oracle for the rollout (reset's observation in the prompt, each environment's tools in its prompt and callable on its
own instance, get_reward as a reward function, `environments` given to the reward functions), with one environment
and with two routed by an `environment` column, with the same scripted turns on both sides; plus the pool, the
dataset-free run and the refusals."""
import pytest
from grpo_tools_oracle import (END, G, assert_rollouts_equal, call, our_rollout, ours, scripted, tool_model,
                               tool_tokenizer, trl_rollout)

from fasttune.errors import ConfigError, DataError

trl = pytest.importorskip("trl")


class GuessEnv:
    """Guess a number; the reward is whether it was found, less a tenth per guess."""

    made = 0

    def __init__(self):
        GuessEnv.made += 1
        self.target, self.guesses = None, []

    def reset(self, **row):
        self.target, self.guesses = row["target"], []
        return f" (from 1 to 9; row {row['target']})"

    def guess(self, number: int) -> str:
        """Guess the number.

        Args:
            number: The guess.
        """
        self.guesses.append(number)
        return "higher" if number < self.target else "lower" if number > self.target else "correct"

    def get_reward(self) -> float:
        return float(self.target in self.guesses) - 0.1 * len(self.guesses)


class EchoEnv:
    """No reward of its own, no observation."""

    def reset(self, **row):
        return None

    def echo(self, text: str) -> str:
        """Repeat a text.

        Args:
            text: What to repeat.
        """
        return text * 2


def hint(n: int) -> str:
    """A hint about a number.

    Args:
        n: The number.
    """
    return "odd" if n % 2 else "even"


ROWS = [{"prompt": [{"role": "user", "content": "Find it"}], "target": 3},
        {"prompt": [{"role": "user", "content": "Again"}], "target": 6}]
MIXED = [{**ROWS[0], "environment": "guess"}, {"prompt": [{"role": "user", "content": "Say hi"}], "target": 0,
                                              "environment": "echo"}]


def _turn(text: str, i: int) -> str:
    """First turns: guesses (one wrong, then right after "higher"), a hint, an echo, a plain answer; after results,
    a guess of 3 after "higher", else done."""
    seen = text.count("<tool_response>")
    if not seen:
        return [call("guess", number=1) + END, call("guess", number=3) + END, call("hint", n=5) + END, "no" + END,
                call("echo", text="hi") + END, call("guess", number=9) + END, "done" + END,
                call("guess", number=6) + call("guess", number=7) + END][i]
    if seen == 1 and "<tool_response>\nhigher" in text:
        return call("guess", number=3) + END
    return "done" + END


Scripted, ScriptedTRL = scripted(_turn)


def guesses(completions, environments, **_):
    """Reads `environments`: each rollout's instance, in completion order."""
    return [float(len(getattr(e, "guesses", []))) for e in environments]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tool_model(tmp_path_factory, tool_tokenizer())


def _both(setup, tmp_path, rows, factory, tools=None, **cfg):
    model, tok, adapter = setup
    cfg = {"max_completion_length": 400, **cfg}
    mine = ours(Scripted, model, tok, tmp_path, rows, [guesses], environment_factory=factory, tools=tools, cfg=cfg)
    got = our_rollout(mine)
    kwargs = {"tools": tools} if tools else {}
    tr, want = trl_rollout(ScriptedTRL, setup[2], tok, tmp_path, rows, [guesses], environment_factory=factory,
                           cfg=cfg, **kwargs)
    return mine, got, tr, want


def test_one_environment_equals_trl(setup, tmp_path):
    mine, got, tr, want = _both(setup, tmp_path, ROWS, GuessEnv, tools=[hint])
    assert_rollouts_equal(got, want)
    prompts, completions = mine._scored
    assert prompts[0][-1]["content"] == "Find it (from 1 to 9; row 3)"  # reset's observation joined the prompt
    assert [m["content"] for m in completions[0] if m["role"] == "tool"] == ["higher", "correct"]
    assert completions[2][1]["content"] == "odd"  # the standalone tool beside the environment's
    assert "not found" in completions[4][1]["content"]  # echo belongs to no environment here
    assert mine.reward_names == ["guesses", "GuessEnv"]
    theirs = tr._metrics["train"]
    for name in ("rewards/GuessEnv/mean", "rewards/guesses/mean", "reward", "tools/call_frequency",
                 "tools/failure_frequency"):
        assert mine._metrics[name][-1] == pytest.approx(theirs[name][-1], rel=1e-6), name
    assert mine._metrics["rewards/GuessEnv/mean"][-1] != 0


def test_two_environments_routed_by_row_equal_trl(setup, tmp_path):
    factories = {"guess": GuessEnv, "echo": EchoEnv}
    mine, got, tr, want = _both(setup, tmp_path, MIXED, factories)
    assert_rollouts_equal(got, want)  # each prompt renders its own environment's tools
    prompts, completions = mine._scored
    assert completions[4][1]["content"] == "hihi"  # echo runs on the echo rows' instances
    assert "not found" in completions[5][1]["content"]  # guess is not the echo rows' tool
    assert "correct" == completions[1][1]["content"]  # but the guess rows' one
    theirs = tr._metrics["train"]
    for name in ("rewards/GuessEnv/mean", "reward", "tools/call_frequency", "tools/failure_frequency"):
        assert mine._metrics[name][-1] == pytest.approx(theirs[name][-1], rel=1e-6, nan_ok=True), name


def test_pool_keeps_instances_across_rollouts_and_runs_without_a_dataset(setup, tmp_path):
    model, tok, _ = setup
    GuessEnv.made = 0
    mine = ours(Scripted, model, tok, tmp_path, ROWS, [guesses], environment_factory=GuessEnv,
                cfg={"max_completion_length": 400})
    our_rollout(mine)
    our_rollout(mine)
    assert GuessEnv.made == 2 * G  # the probe is the first of the pool; reused by the second rollout

    class Placed(GuessEnv):
        def reset(self, **row):
            assert row["prompt"] == [{"role": "user", "content": ""}]  # the stand-in row
            return super().reset(target=4)

    trainer = ours(Scripted, model, tok, tmp_path, None, [guesses], environment_factory=Placed,
                   cfg={"max_completion_length": 400, "max_steps": 1})
    assert len(trainer.train_examples) == 2 * G  # one generation batch of empty prompts (each G times)
    batch = our_rollout(trainer)
    assert batch["completion_mask"].sum() > 0


def test_refusals_name_the_fix(setup, tmp_path):
    model, tok, _ = setup

    class NoReset:
        pass

    def make(factory, rows=ROWS, funcs=(guesses,), **cfg):
        return ours(Scripted, model, tok, tmp_path, rows, list(funcs), environment_factory=factory,
                    cfg={"max_completion_length": 400, **cfg})

    with pytest.raises(ConfigError, match="NoReset, which has no reset"):
        make(NoReset)
    with pytest.raises(ConfigError, match=r"environment_factory\['x'\] is not callable"):
        make({"x": 3})
    with pytest.raises(DataError, match="Row 0.*'environment' is None.*'guess', 'echo'"):
        make({"guess": GuessEnv, "echo": EchoEnv})
    with pytest.raises(ConfigError, match="several environments need a train_dataset"):
        make({"guess": GuessEnv, "echo": EchoEnv}, rows=None)
    with pytest.raises(ConfigError, match="set max_steps"):
        make(GuessEnv, rows=None, max_steps=-1)
    with pytest.raises(ConfigError, match="at least one reward function"):
        make(EchoEnv, funcs=())  # no reward function and no get_reward
    assert make(GuessEnv, funcs=()).reward_names == ["GuessEnv"]  # get_reward alone is a reward source
    from fasttune import RLOOConfig, RLOOTrainer

    with pytest.raises(ConfigError, match="RLOOTrainer does not implement environment_factory"):
        RLOOTrainer(model, reward_funcs=[guesses], processing_class=tok, train_dataset=ROWS,
                    environment_factory=GuessEnv, args=RLOOConfig(output_dir=str(tmp_path / "r"),
                                                                  per_device_train_batch_size=G, num_generations=G))
