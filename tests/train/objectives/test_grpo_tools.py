"""GRPO with tools (TRL's tool loop, grpo_tools.py): TRL's GRPOTrainer(tools=...) on a PEFT twin is the oracle for the
rollout (completion tokens with the tool results between turns, the tool mask, the messages the reward functions
get, the tool and length metrics) and for the loss and gradients, with the same scripted turns on both sides; plus
the refusals and a short training run."""
import pytest
import torch
from grpo_oracle import assert_step_equals_trl
from grpo_tools_oracle import (END, assert_rollouts_equal, call, our_rollout, ours, scripted, tool_model,
                               tool_tokenizer, trl_rollout)

from fasttune import GRPOConfig, GRPOTrainer
from fasttune.errors import ConfigError, DataError

trl = pytest.importorskip("trl")

ROWS = [{"prompt": [{"role": "user", "content": "What is 3 times 4?"}]},
        {"prompt": [{"role": "user", "content": "x"}]}]
BUDGET = 250  # max_completion_length: completion 6's second tool result does not fit


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


async def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def broken(x: int) -> int:
    """A tool that fails.

    Args:
        x: Any integer.
    """
    raise RuntimeError("boom")


TOOLS = [multiply, add, broken]


# The first turn of each completion (prompt i // G): tool calls (sync, two at once with an async one, an unknown
# tool, a failing tool), plain answers, a call whose result leads to a second call, and a cut-off malformed call.
FIRST = [call("multiply", a=3, b=4) + END, "12" + END,
         call("multiply", a=2, b=5) + "\n" + call("add", a=1, b=1) + END, call("divide", a=1, b=2) + END,
         call("broken", x=1) + END, "b" + END, call("multiply", a=6, b=7) + END,
         '<tool_call>\n{"name": "multiply", "argu']


def _turn(text: str, i: int) -> str:
    """A first turn by position; after tool results, completion 6 calls again after its first result and the others
    answer with the number of results they saw."""
    seen = text.count("<tool_response>")
    if not seen:
        return FIRST[i]
    if '"a": 6' in text and seen == 1:
        return call("multiply", a=42, b=2) + END
    return f"final {seen}" + END


Scripted, ScriptedTRL = scripted(_turn)


def tool_reward(prompts, completions, **_):
    """Reads the message lists: tool messages seen, plus 0.5 for a last turn that answers."""
    return [sum(m["role"] == "tool" for m in c) + 0.5 * ("final" in (c[-1].get("content") or "")) for c in completions]


@pytest.fixture(scope="module")
def tool_setup(tmp_path_factory):
    return tool_model(tmp_path_factory, tool_tokenizer())


def _ours(model, tok, tmp_path, cls=Scripted, tools=TOOLS, rows=ROWS, **cfg):
    return ours(cls, model, tok, tmp_path, rows, [tool_reward], tools=tools,
                cfg={"max_completion_length": BUDGET, **cfg})


def _trl(adapter, tok, tmp_path, **cfg):
    return trl_rollout(ScriptedTRL, adapter, tok, tmp_path, ROWS, [tool_reward], tools=TOOLS,
                       cfg={"max_completion_length": BUDGET, **cfg})


@pytest.mark.parametrize("iterations", [None, 1])
def test_rollout_equals_trls_tool_loop(tool_setup, tmp_path, iterations):
    model, tok, adapter = tool_setup
    ours_ = _ours(model, tok, tmp_path, max_tool_calling_iterations=iterations)
    got = our_rollout(ours_)
    tr, want = _trl(adapter, tok, tmp_path, max_tool_calling_iterations=iterations)
    assert_rollouts_equal(got, want)  # the prompts with the tools' schemas (TRL's training template)
    assert (want["tool_mask"] * want["completion_mask"] == 0).any() and (want["completion_mask"].sum(1) > 0).all()
    assert got["advantages"].abs().sum() > 0
    theirs = tr._metrics["train"]
    for name in ("tools/call_frequency", "tools/failure_frequency", "reward", "completions/mean_length",
                 "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length"):
        assert ours_._metrics[name][-1] == pytest.approx(theirs[name][-1], rel=1e-6), name
    # What happened, so that the comparison covers it: failures (unknown and failing tools), two calls in one turn,
    # a second tool turn (without the limit), and a result dropped for the budget.
    assert ours_._metrics["tools/failure_frequency"][-1] > 0
    prompts, completions = ours_._scored
    roles = [[m["role"] for m in c] for c in completions]
    assert roles[1] == ["assistant"] and roles[2] == ["assistant", "tool", "tool", "assistant"]
    assert roles[6] == ["assistant", "tool", "assistant"]  # (the budget, or the limit, ends it)
    assert completions[2][1]["content"] == "10" and completions[2][2]["content"] == "2"  # sync, then async
    assert "boom" in completions[4][1]["content"] and "not found" in completions[3][1]["content"]
    assert completions[6][-1]["tool_calls"][0]["function"]["arguments"] == {"a": 42, "b": 2}


def test_loss_and_grads_equal_trl(tool_setup, tmp_path):
    model, tok, adapter = tool_setup
    cfg = dict(loss_type="dapo", beta=0.1, epsilon=0.2, temperature=0.8)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        ours_ = _ours(model, tok, tmp_path, **cfg)
        batch = ours_.to_device(our_rollout(ours_))
        tr, inputs = _trl(adapter, tok, tmp_path, **cfg)
        assert_step_equals_trl(model, ours_, batch, int(batch["completion_mask"].sum()), tr, inputs,
                               metrics=("kl",), clipped=None)
    finally:  # the model is shared by the module's tests
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])


def test_trains_with_real_sampling(tool_setup, tmp_path):
    """Sampled (not scripted) completions: a step trains and logs the tool metrics."""
    model, tok, _ = tool_setup
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        tr = _ours(model, tok, tmp_path, cls=GRPOTrainer, max_completion_length=8, logging_steps=1)
        tr.train()
        logged = [e for e in tr.state.log_history if "tools/call_frequency" in e]
        assert logged and logged[0]["tools/failure_frequency"] == 0.0
        ids, _ = tr.sample([tr.train_examples[0]], seed=1, max_new_tokens=3)  # a later turn's room left
        assert 0 < len(ids[0]) <= 3
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])


def test_refusals_name_the_fix(tool_setup, tmp_path, tiny_tokenizer):
    model, tok, _ = tool_setup
    with pytest.raises(ConfigError, match="not a named function"):
        _ours(model, tok, tmp_path, tools=[multiply, 3])
    with pytest.raises(ConfigError, match="two tools are named multiply"):
        _ours(model, tok, tmp_path, tools=[multiply, multiply])
    with pytest.raises(ConfigError, match="cannot render a tool-calling conversation"):
        _ours(model, tiny_tokenizer, tmp_path)  # plain ChatML: no tools in the template
    with pytest.raises(DataError, match="Row 0.*'prompt' is a string.*conversational"):
        _ours(model, tok, tmp_path, rows=[{"prompt": "hi"}])
    with pytest.raises(DataError, match="Row 0.*with the tools' schemas, more than max_prompt_length=64"):
        _ours(model, tok, tmp_path, max_prompt_length=64)
    with pytest.raises(ConfigError, match="max_tool_calling_iterations=-1"):
        GRPOConfig(output_dir=str(tmp_path / "e"), max_tool_calling_iterations=-1)


def test_gmpo_takes_the_same_tool_loop(tool_setup, tmp_path):
    """GMPOTrainer (TRL's subclass of GRPOTrainer) runs the same loop: its scripted batch equals GRPO's."""
    from fasttune import GMPOConfig, GMPOTrainer

    model, tok, _ = tool_setup

    class ScriptedGMPO(GMPOTrainer):
        sample = Scripted.sample

    gmpo = ScriptedGMPO(model, reward_funcs=[tool_reward], processing_class=tok, train_dataset=ROWS, tools=TOOLS,
                        args=GMPOConfig(output_dir=str(tmp_path / "g"), shuffle=False, per_device_train_batch_size=8,
                                        num_generations=4, max_completion_length=BUDGET))
    got, want = our_rollout(gmpo), our_rollout(_ours(model, tok, tmp_path))
    for key in ("input_ids", "attention_mask", "completion_mask", "advantages"):
        torch.testing.assert_close(got[key], want[key])
