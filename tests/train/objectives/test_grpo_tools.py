"""GRPO with tools (TRL's tool loop, grpo_tools.py): TRL's GRPOTrainer(tools=...) on a PEFT twin is the oracle for the
rollout (completion tokens with the tool results between turns, the tool mask, the messages the reward functions
get, the tool and length metrics) and for the loss and gradients, with the same scripted turns on both sides; plus
the refusals and a short training run."""
import copy
import json

import pytest
import torch
from grpo_oracle import assert_step_equals_trl
from peft_oracle import peft_twin, randomize_lora_b
from tiny import hf_model, save_hf
from tiny_tokenizer import make_tiny_tokenizer

from fasttune import FastLanguageModel, GRPOConfig, GRPOTrainer
from fasttune.errors import ConfigError, DataError

trl = pytest.importorskip("trl")
from trl.chat_template_utils import qwen3_chat_template  # noqa: E402

G = 4
LONG = dict(max_position_embeddings=4096)  # byte tokens: the tools' schemas alone are ~700
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


def _call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


END = "<|im_end|>"
# The first turn of each completion (prompt i // G): tool calls (sync, two at once with an async one, an unknown
# tool, a failing tool), plain answers, a call whose result leads to a second call, and a cut-off malformed call.
FIRST = [_call("multiply", a=3, b=4) + END, "12" + END,
         _call("multiply", a=2, b=5) + "\n" + _call("add", a=1, b=1) + END, _call("divide", a=1, b=2) + END,
         _call("broken", x=1) + END, "b" + END, _call("multiply", a=6, b=7) + END,
         '<tool_call>\n{"name": "multiply", "argu']


def _script(text: str) -> str:
    """The turn after tool results (the context's text): completion 6 calls again after its first result, the
    others answer with the number of results they saw."""
    seen = text.count("<tool_response>")
    if '"a": 6' in text and seen == 1:
        return _call("multiply", a=42, b=2) + END
    return f"final {seen}" + END


def _turn(tok, context_ids, i):
    text = tok.decode(context_ids)
    out = FIRST[i] if "<tool_response>" not in text else _script(text)
    return tok(out, add_special_tokens=False)["input_ids"]


def tool_reward(prompts, completions, **_):
    """Reads the message lists: tool messages seen, plus 0.5 for a last turn that answers."""
    return [sum(m["role"] == "tool" for m in c) + 0.5 * ("final" in (c[-1].get("content") or "")) for c in completions]


class ScriptedTRL(trl.GRPOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [_turn(self.processing_class, ids, i) for i, ids in enumerate(prompt_ids)], None


class Scripted(GRPOTrainer):
    def sample(self, examples, seed, model=None, max_new_tokens=None):
        out = [_turn(self.tokenizer, ex["prompt_ids"], i) for i, ex in enumerate(examples)]
        return out, [self.tokenizer.eos_token_id not in c for c in out]


@pytest.fixture(scope="module")
def tool_tok():
    tok = make_tiny_tokenizer(qwen3_chat_template)
    tok.eos_token = END  # Qwen3's turn end, as its tokenizer has it
    return tok


@pytest.fixture(scope="module")
def tool_setup(tmp_path_factory, tool_tok):
    folder = tmp_path_factory.mktemp("grpo_tools") / "llama"
    save_hf(hf_model("llama", seed=0, **LONG), folder, tool_tok)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora_b(model)
    adapter = tmp_path_factory.mktemp("grpo_tools_adapter") / "adapter"
    model.save_pretrained(str(adapter))
    return model, tok, adapter


def _cfg(**cfg):
    return {"per_device_train_batch_size": 2 * G, "gradient_accumulation_steps": 1, "num_generations": G,
            "max_completion_length": BUDGET, "max_steps": 1, "max_grad_norm": 0.0, **cfg}


def _ours(model, tok, tmp_path, cls=Scripted, tools=TOOLS, rows=ROWS, **cfg):
    return cls(model, reward_funcs=[tool_reward], processing_class=copy.deepcopy(tok), train_dataset=rows,
               tools=tools, args=GRPOConfig(output_dir=str(tmp_path / "ours"), shuffle=False, **_cfg(**cfg)))


def _trl(adapter, tok, tmp_path, **cfg):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                          **{k: v for k, v in _cfg(**cfg).items() if k not in ("max_steps", "max_grad_norm")})
    tr = ScriptedTRL(model=peft_twin("llama", adapter, **LONG), reward_funcs=[tool_reward], args=args,
                     train_dataset=Dataset.from_list(ROWS), processing_class=copy.deepcopy(tok), tools=TOOLS)
    tr.current_gradient_accumulation_steps = 1
    return tr, tr._generate_and_score_completions([row for row in ROWS for _ in range(G)])


def _our_batch(trainer):
    examples = [trainer.train_examples[i] for i in range(2 * G)]
    return trainer.rollout(examples, [2 * G], seed=0)[0]


@pytest.mark.parametrize("iterations", [None, 1])
def test_rollout_equals_trls_tool_loop(tool_setup, tmp_path, iterations):
    model, tok, adapter = tool_setup
    ours = _ours(model, tok, tmp_path, max_tool_calling_iterations=iterations)
    got = _our_batch(ours)
    tr, want = _trl(adapter, tok, tmp_path, max_tool_calling_iterations=iterations)
    width = want["prompt_ids"].shape[1]
    torch.testing.assert_close(got["input_ids"][:, :width], want["prompt_ids"])  # tools' schemas, training template
    n = want["completion_ids"].shape[1]
    comp = got["input_ids"][:, width:]
    assert comp.shape[1] == n
    mask = want["completion_mask"]
    torch.testing.assert_close(comp * mask, want["completion_ids"] * mask)
    torch.testing.assert_close(got["attention_mask"][:, width:], mask)  # attention sees the tool results
    torch.testing.assert_close(got["completion_mask"], mask * want["tool_mask"])  # the loss does not
    assert (want["tool_mask"] * mask == 0).any() and (mask.sum(1) > 0).all()
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-6, atol=1e-6)
    assert got["advantages"].abs().sum() > 0
    theirs = tr._metrics["train"]
    for name in ("tools/call_frequency", "tools/failure_frequency", "reward", "completions/mean_length",
                 "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length"):
        assert ours._metrics[name][-1] == pytest.approx(theirs[name][-1], rel=1e-6), name
    # What happened, so that the comparison covers it: failures (unknown and failing tools), two calls in one turn,
    # a second tool turn (without the limit), and a result dropped for the budget.
    assert ours._metrics["tools/failure_frequency"][-1] > 0
    prompts, completions = ours._scored
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
        ours = _ours(model, tok, tmp_path, **cfg)
        batch = ours.to_device(_our_batch(ours))
        tr, inputs = _trl(adapter, tok, tmp_path, **cfg)
        assert_step_equals_trl(model, ours, batch, int(batch["completion_mask"].sum()), tr, inputs, metrics=("kl",),
                               clipped=None)
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
    with pytest.raises(ConfigError, match="max_tool_calling_iterations=-1"):
        GRPOConfig(output_dir=str(tmp_path / "e"), max_tool_calling_iterations=-1)
