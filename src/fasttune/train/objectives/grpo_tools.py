"""GRPO's tool calls inside a rollout: TRL 1.16's `GRPOTrainer(tools=[...])` (its `_tool_call_loop`), on fasttune's
sampler.

Prompts are rendered with the tools' schemas (`apply_chat_template(tools=...)`). After each sampled turn the new
tokens are parsed into an assistant message (transformers' response parsing, with the response template TRL sets for
the chat templates it knows); each tool call runs (sync or async; an exception, an unknown tool or a call that is not
a function call becomes an `{"error": ...}` result, counted as a failure), every result becomes a `tool` message, and
the tokens the chat template writes for those messages (up to the next assistant header) are appended to the
completion. The model then samples its next turn from there. The loop ends for a completion when its turn calls no
tool, after max_tool_calling_iterations turns with tools, or when the tool results would take it past
max_completion_length (or the model's context): those results are then dropped and the completion ends with the
turn that called them, as TRL does. A last turn longer than the budget left is cut to it.

The tool results' tokens are context, not the policy's output: the loss, the normalising token counts and the length
metrics skip them (the tool mask); attention sees them. Reward functions get each completion as its message list
(the parsed assistant turns with their `tool_calls`, and the tool messages) and its full token ids.

TRL's chat-template helpers are borrowed (trl.chat_template_utils): the response templates, the check that a template
renders a tool-calling conversation, and the training-safe template that replaces one which does not keep the earlier
turns' tokens when a turn is added (Qwen3's drops past reasoning), so that appended tokens equal a re-rendering.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from fasttune.errors import ConfigError
from fasttune.train.rewards import is_async_callable, run_async


@dataclass
class ToolTurns:
    """A rollout's completions after the tool loop: token ids (the model's turns and the tool results between them),
    tool_masks (1 for the model's tokens, 0 for the tool results', per token), messages (each completion as its
    message list; None after a rollout_func, whose completions are decoded as sampled ones are), calls and failures
    (tool calls made and failed in this rollout)."""

    completion_ids: list
    tool_masks: list
    messages: list
    calls: int = 0
    failures: int = 0


def _chat_template_utils(trainer_name: str):
    try:
        from trl import chat_template_utils
    except ImportError:
        raise ConfigError(f"{trainer_name}(tools=...) parses tool calls with TRL's response templates; install TRL "
                          f"(pip install trl) or leave tools out.") from None
    return chat_template_utils


class ToolCalls:
    """The tools of a GRPO run and what the loop needs from the chat template.

    tools: callables (sync or async) with type hints and a Google-style docstring, as TRL and transformers'
    `apply_chat_template(tools=...)` take them; called by their __name__. tokenizer: the trainer's tokenizer, whose
    chat template must render tool calls; a response template is set on it when it has none (TRL's
    add_response_schema, which knows Qwen 2.5 / 3 / 3.5, Llama 3.1 / 3.2, gpt-oss, GLM-4.5, Gemma 4, LFM2 and more).
    max_iterations: TRL's max_tool_calling_iterations (None: no limit but the completion budget).
    template_kwargs: TRL's chat_template_kwargs.

    Raises ConfigError without TRL, for a tool that is not a named callable or two tools of one name, a template
    that cannot render a tool call, or one TRL has no response template for (set tokenizer.response_template)."""

    def __init__(self, tools, tokenizer, max_iterations: int | None, template_kwargs: dict | None,
                 trainer_name: str):
        self.utils = _chat_template_utils(trainer_name)
        tools = list(tools)
        names = []
        for i, tool in enumerate(tools):
            if not callable(tool) or not getattr(tool, "__name__", None):
                raise ConfigError(f"{trainer_name}: tools[{i}] ({tool!r}) is not a named function; give functions "
                                  f"with type hints and a docstring (as TRL's tools).")
            names.append(tool.__name__)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{trainer_name}: two tools are named {', '.join(twice)}; the model calls tools by "
                              f"name, so give each its own.")
        self.tools, self.tokenizer = tools, tokenizer
        self.max_iterations = max_iterations
        self.template_kwargs = dict(template_kwargs or {})
        u = self.utils
        if not u.supports_tool_calling(tokenizer):
            raise ConfigError(f"{trainer_name}: the tokenizer's chat template cannot render a tool-calling "
                              f"conversation (user -> assistant with tool_calls -> tool), so tools cannot be used. Set "
                              f"a template that can (e.g. the model family's own).")
        if all(getattr(tokenizer, name, None) is None for name in ("response_template", "response_schema")):
            try:
                u.add_response_schema(tokenizer)
            except ValueError as e:
                raise ConfigError(f"{trainer_name}: tool calls in sampled completions cannot be parsed with this chat "
                                  f"template ({e}). Set tokenizer.response_template for it (transformers' response "
                                  f"parsing).") from None
        # A template that renders an earlier turn differently once a later one follows would make the appended tool
        # tokens disagree with a re-rendering: TRL swaps in its training-safe version for prompts and tool results.
        self.chat_template = None
        if not u.is_chat_template_prefix_preserving(tokenizer):
            try:
                self.chat_template = u.get_training_chat_template(tokenizer)
            except ValueError as e:
                raise ConfigError(f"{trainer_name}: the chat template renders earlier turns differently once a tool "
                                  f"turn follows, and TRL has no training-safe version of it ({e}). Set a "
                                  f"prefix-preserving chat template.") from None

    def prompt_kwargs(self, tools: list | None = None) -> dict:
        """Keyword arguments of apply_chat_template for the prompts: the schemas of `tools` (default: all of them;
        an environment's prompts render its own) and the template."""
        return {"tools": (self.tools if tools is None else tools) or None, "chat_template": self.chat_template,
                **self.template_kwargs}

    def parse(self, ids: list[int], prefix: list[int], tools: list | None = None) -> dict:
        """A sampled turn's token ids (after the `prefix` ids it continued) -> an assistant message, with
        `tool_calls` when it calls tools (TRL's parse_response with the schemas of `tools`, default all: plain text
        where parsing fails)."""
        return self.utils.parse_response(self.tokenizer, ids, prefix=prefix,
                                         tools=self.tools if tools is None else tools)

    def run(self, tool_calls: list[dict], tools: list | None = None) -> tuple[list[dict], int]:
        """Run one turn's tool calls with `tools` (default all; a rollout with an environment: the standalone tools
        and that instance's) -> (their `tool` messages: the sync tools' results in call order, then the async ones',
        as TRL orders them; the number that failed)."""
        tools = self.tools if tools is None else tools
        sync = {t.__name__: t for t in tools if not is_async_callable(t)}
        coroutines = {t.__name__: t for t in tools if is_async_callable(t)}
        results, pending, failures = [], [], 0
        for call in tool_calls:
            if call.get("type") != "function":
                failures += 1
                results.append((call.get("name", "unknown"),
                                {"error": f"Unsupported tool call type: {call.get('type')}"}))
                continue
            name, arguments = call["function"]["name"], call["function"].get("arguments") or {}
            try:
                if name in sync:
                    results.append((name, sync[name](**arguments)))
                elif name in coroutines:
                    pending.append((name, coroutines[name](**arguments)))
                else:
                    raise ValueError(f"Tool {name} not found.")
            except Exception as e:  # a tool's failure is the model's to learn from, as in TRL
                failures += 1
                results.append((name, {"error": str(e)}))
        if pending:
            for (name, _), (value, error) in zip(pending, run_async([_caught(c) for _, c in pending])):
                failures += error is not None
                results.append((name, {"error": str(error)} if error is not None else value))
        return [{"role": "tool", "name": name, "content": value if isinstance(value, list) else str(value)}
                for name, value in results], failures

    def suffix_ids(self, tool_messages: list[dict]) -> list[int]:
        """The token ids the chat template writes for `tool_messages` after an assistant turn that called tools, up
        to and including the next assistant header: a one-call conversation rendered with and without them (TRL's
        _get_tool_suffix_ids, with its cut of the shorter one at its last EOS). Raises ConfigError when the shorter
        rendering is not a prefix of the longer."""
        tok = self.tokenizer
        called = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
        head = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": called}]
        kwargs = dict(tokenize=True, chat_template=self.chat_template, return_dict=False, **self.template_kwargs)
        before = list(tok.apply_chat_template(head, add_generation_prompt=False, **kwargs))
        after = list(tok.apply_chat_template(head + tool_messages, add_generation_prompt=True, **kwargs))
        # (Qwen's templates write "<|im_end|>\n" after a turn: the boundary is the EOS, not the newline after it)
        ends = [i for i, t in enumerate(before) if t == tok.eos_token_id]
        if ends:
            before = before[:ends[-1] + 1]
        if after[:len(before)] != before:
            raise ConfigError("The chat template renders an assistant turn with tool calls differently once tool "
                              "results follow it, so the tool results' tokens cannot be appended to a completion. Set "
                              "a prefix-preserving chat template.")
        return after[len(before):]


async def _caught(coroutine):
    """(value, None), or (None, the exception) when the coroutine raises: one failing async tool leaves the others'
    results (TRL gathers them with return_exceptions=True)."""
    try:
        return await coroutine, None
    except Exception as e:
        return None, e


def tool_turns(trainer, examples: list[dict], completion_ids: list[list[int]], seed: int,
               row_tools: list | None = None) -> ToolTurns:
    """TRL's tool loop over one rollout's first turns.

    trainer: the GRPOTrainer (its `tool_calls`, `args.max_completion_length`, `sample`, `model`); examples: the
    rollout's prepared examples (prompt_ids, a message-list prompt); completion_ids: each example's first sampled
    turn, stop token included; seed: the rollout's seed (each later turn samples with seed + its index); row_tools:
    per example (the tools it may call, the tools whose schemas parse its turns), with environments; None: all tools.
    Returns the completions with their tool results and later turns (ToolTurns)."""
    tc, budget = trainer.tool_calls, trainer.args.max_completion_length
    row_tools = row_tools or [(None, None)] * len(examples)
    context_limit = getattr(trainer.model.config, "max_position_embeddings", None) or float("inf")
    prompt_ids = [ex["prompt_ids"] for ex in examples]
    turns = ToolTurns([list(c) for c in completion_ids], [[1] * len(c) for c in completion_ids],
                      [[tc.parse(c, p, row_tools[i][1])] for i, (c, p) in enumerate(zip(completion_ids, prompt_ids))])
    pending = [i for i, m in enumerate(turns.messages) if m[-1].get("tool_calls")]
    iteration = 0
    while pending and (tc.max_iterations is None or iteration < tc.max_iterations):
        contexts, kept = [], []
        for i in pending:
            messages, failures = tc.run(turns.messages[i][-1]["tool_calls"], row_tools[i][0])
            turns.calls += len(turns.messages[i][-1]["tool_calls"])
            turns.failures += failures
            context = prompt_ids[i] + turns.completion_ids[i] + tc.suffix_ids(messages)
            if len(context) - len(prompt_ids[i]) > budget or len(context) >= context_limit:
                continue  # the results would not fit: the completion ends with the turn that called them
            turns.messages[i] += copy.deepcopy(messages)
            contexts.append(context)
            kept.append(i)
        if not kept:
            break
        room = [budget - (len(c) - len(prompt_ids[i])) for c, i in zip(contexts, kept)]
        if max(room) > 0:
            later, _ = trainer.sample([{"prompt_ids": c} for c in contexts], seed + 1 + iteration,
                                      max_new_tokens=max(room))
        else:
            later = [[] for _ in kept]
        pending = []
        for i, context, ids, left in zip(kept, contexts, later, room):
            ids = ids[:left]
            shown = len(context) - len(prompt_ids[i]) - len(turns.completion_ids[i])
            turns.tool_masks[i] += [0] * shown + [1] * len(ids)
            turns.completion_ids[i] = context[len(prompt_ids[i]):] + ids
            if ids:
                message = tc.parse(ids, context, row_tools[i][1])
                turns.messages[i].append(message)
                if message.get("tool_calls"):
                    pending.append(i)
        iteration += 1
    return turns
