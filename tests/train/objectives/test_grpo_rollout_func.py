"""GRPO with the user's rollout (TRL's rollout_func, grpo_rollout_func.py): TRL's GRPOTrainer on a PEFT twin is the
oracle for the scored batch (the returned prompt and completion tokens, env_mask keeping inserted tokens out of the
loss, extra fields reaching the reward functions); plus a training step and the refusals."""
import pytest
from grpo_tools_oracle import END, G, assert_rollouts_equal, our_rollout, ours, tool_model, tool_tokenizer, trl_rollout

from fasttune import GRPOTrainer
from fasttune.errors import ConfigError

trl = pytest.importorskip("trl")

ROWS = [{"prompt": [{"role": "user", "content": "Say a"}]}, {"prompt": [{"role": "user", "content": "Say b"}]}]


def rollout(prompts, trainer):
    """Two model turns around an inserted user turn (env_mask 0), and a `bonus` field for the rewards."""
    tok = trainer.processing_class

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    out = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask", "bonus")}
    for i, prompt in enumerate(prompts):
        first, inserted, last = ids(f"a{i}"), ids(" [more please] "), ids("b" * (i % 3) + END)
        out["prompt_ids"].append(ids(f"Q: {prompt[-1]['content']}\n"))
        out["completion_ids"].append(first + inserted + last)
        out["logprobs"].append([0.0] * len(first + inserted + last))
        out["env_mask"].append([1] * len(first) + [0] * len(inserted) + [1] * len(last))
        out["bonus"].append(float(i % 2))
    return out


def with_bonus(completions, bonus, **_):
    return [b + c[-1]["content"].count("b") for b, c in zip(bonus, completions)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tool_model(tmp_path_factory, tool_tokenizer())


def test_rollout_func_equals_trl(setup, tmp_path):
    model, tok, adapter = setup
    mine = ours(GRPOTrainer, model, tok, tmp_path, ROWS, [with_bonus], rollout_func=rollout,
                cfg={"max_completion_length": 32})
    got = our_rollout(mine)
    tr, want = trl_rollout(trl.GRPOTrainer, adapter, tok, tmp_path, ROWS, [with_bonus], rollout_func=rollout,
                           cfg={"max_completion_length": 32})
    assert_rollouts_equal(got, want)
    assert (want["tool_mask"] == 0).any() and got["advantages"].abs().sum() > 0
    theirs = tr._metrics["train"]
    for name in ("reward", "completions/mean_length", "completions/clipped_ratio"):
        assert mine._metrics[name][-1] == pytest.approx(theirs[name][-1], rel=1e-6), name


def test_trains_and_refuses_bad_output(setup, tmp_path):
    model, tok, _ = setup
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        trainer = ours(GRPOTrainer, model, tok, tmp_path, ROWS, [with_bonus], rollout_func=rollout,
                       cfg={"max_completion_length": 32, "max_steps": 1, "logging_steps": 1})
        trainer.train()
        assert trainer.state.log_history[0]["grad_norm"] > 0
    finally:
        for n, p in model.named_parameters():
            if n in start:
                p.data.copy_(start[n])

    def run(func, **kwargs):
        t = ours(GRPOTrainer, model, tok, tmp_path, ROWS, [with_bonus], rollout_func=func,
                 cfg={"max_completion_length": 32}, **kwargs)
        return our_rollout(t)

    with pytest.raises(ConfigError, match=r"must return keys \['logprobs'\]"):
        run(lambda p, t: {k: v for k, v in rollout(p, t).items() if k != "logprobs"})
    with pytest.raises(ConfigError, match=f"returned 1 completion_ids for {2 * G} prompts"):
        run(lambda p, t: {**rollout(p, t), "completion_ids": [[1]]})
    with pytest.raises(ConfigError, match="env_mask entries must be as long"):
        run(lambda p, t: {**rollout(p, t), "env_mask": [[1]] * len(p)})
    with pytest.raises(ConfigError, match="returned list; return a dict"):
        run(lambda p, t: [])
    with pytest.raises(ConfigError, match="rollout_func with tools or environment_factory is not implemented"):
        run(rollout, tools=[len])
