"""`fasttune chat`: talk to a model in the terminal, multi-turn through its chat template.

/reset clears the conversation, /exit or Ctrl-D ends it; Ctrl-C stops a reply that is being written. When the
conversation outgrows the model's context, the oldest turns are dropped (a system message stays). A chat template
that refuses the conversation (e.g. --system with a template that has no system role) is an error before the first
prompt.
"""
from __future__ import annotations

import sys

HELP = "/reset clears the conversation, /exit or Ctrl-D ends it, Ctrl-C stops a reply."


def register(subparsers):
    """Add the `chat` subcommand (model flags, --system, sampling flags: temperature 0.7, top-p 0.9, 512 new tokens) to
    the CLI's argparse subparsers."""
    from fasttune.commands._common import add_model_flags, add_sampling_flags

    p = subparsers.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    add_sampling_flags(p, temperature=0.7, top_p=0.9, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)


def fit_context(tokenizer, history: list[dict], budget: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest turns (keeping a leading system message) until the rendered prompt fits `budget` tokens."""
    from fasttune.errors import ConfigError
    from fasttune.generate import chat_prompt_ids

    keep = 1 if history and history[0]["role"] == "system" else 0
    while True:
        ids = chat_prompt_ids(tokenizer, history)
        if len(ids) <= budget:
            return history, ids
        if len(history) - keep <= 1:
            raise ConfigError(f"The message is {len(ids)} tokens; with --max-new-tokens the model's context allows "
                              f"{budget}. Send a shorter message or lower --max-new-tokens.")
        history = history[:keep] + history[keep + 2:]  # the oldest user/assistant pair


def check_template(tokenizer, start: list[dict]) -> None:
    """Render a probe conversation (`start`, i.e. the --system message, plus one user turn) so that a template that
    refuses it (Gemma's has no system role and raises) fails before the first prompt, with advice, rather than
    with a jinja traceback after the first message."""
    from fasttune.errors import ConfigError
    from fasttune.generate import chat_prompt_ids

    def fails(messages) -> str | None:
        try:
            chat_prompt_ids(tokenizer, messages + [{"role": "user", "content": "Hello"}])
        except Exception as e:  # jinja's TemplateError (raise_exception in templates) and others
            return " ".join(str(e).split())[:200] or type(e).__name__
        return None

    reason = fails(start)
    if reason is None:
        return
    if start and fails([]) is None:
        raise ConfigError(f"--system: this model's chat template has no system role (it says: {reason}), so the "
                          f"conversation cannot start with a system message. Drop --system and put the "
                          f"instructions into your first message instead.")
    raise ConfigError(f"This model's chat template cannot render a conversation (it says: {reason}). Fix the "
                      f"tokenizer's chat_template, or use `fasttune generate --no-chat --prompt ...` for plain "
                      f"text continuation.")


def cmd_chat(ns) -> int:
    """Run `fasttune chat` on parsed arguments `ns`: a read-reply loop on stdin/stdout until /exit, Ctrl-D or Ctrl-C at
    the prompt; returns 0. Raises ConfigError for a tokenizer without a chat template, a template that refuses the
    conversation (check_template) or a message longer than the context (fit_context), and what load_model_and_tokenizer
    raises (ModelLoadError, ConfigError)."""
    import torch
    from transformers import TextStreamer

    from fasttune.commands._common import describe_model, load_model_and_tokenizer, sampling_kwargs
    from fasttune.errors import ConfigError
    from fasttune.generate import new_tokens, stop_token_ids

    model, tok = load_model_and_tokenizer(ns.model, ns.adapter, ns.dtype)
    if not getattr(tok, "chat_template", None):
        raise ConfigError("This model's tokenizer has no chat template, so it cannot hold a conversation; use "
                          "`fasttune generate --no-chat --prompt ...` for plain text continuation.")
    start = [{"role": "system", "content": ns.system}] if ns.system else []
    check_template(tok, start)
    history = list(start)
    stops = stop_token_ids(tok, model)
    budget = model.config.max_position_embeddings - ns.max_new_tokens
    kwargs = sampling_kwargs(ns)
    print(f"fasttune chat with {describe_model(model, ns.adapter)}. {HELP}", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:  # Ctrl-D
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"Unknown command {text}. {HELP}", flush=True)
            continue
        history, ids = fit_context(tok, history + [{"role": "user", "content": text}], budget)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        try:
            out = model.generate(torch.tensor([ids]), eos_token_id=stops, streamer=streamer, **kwargs)
        except KeyboardInterrupt:
            print("\n(reply stopped)", flush=True)
            history = history[:-1]
            continue
        reply = tok.decode(new_tokens(out[0], len(ids), stops), skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
    sys.stdout.flush()
    return 0
