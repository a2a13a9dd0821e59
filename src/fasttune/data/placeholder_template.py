"""Chat templates written as plain text with {SYSTEM} / {INPUT} / {OUTPUT} placeholders, the form the peer's Ollama
notebooks pass to `apply_chat_template`, turned into a Jinja chat template. For example

    Below are some tasks. Write a reply that completes each one.

    ### Task:
    {INPUT}

    ### Reply:
    {OUTPUT}

How the text is read:
  - One example (one {INPUT} and one {OUTPUT}): `P {INPUT} M {OUTPUT} E`. The text between the placeholders, M,
    opens the assistant's turn; when M starts with E (the text after {OUTPUT}, e.g. "<|im_end|>\\n"), that part
    closes the user's turn instead. The user's turn starts in P at the last place where P's text begins the way the
    assistant's opening does (their longest common beginning: "\\n\\n### " above, "<|im_start|>" in ChatML); what
    comes before it is the system part, written once at the start. With no common beginning (other than
    whitespace), the whole of P (after {SYSTEM} when there is one) opens each user turn: write two examples to say
    exactly where a turn starts.
  - Two examples (the peer's documented form, `S T T` with T = one user and one assistant turn written the same way
    twice): T is that repeated turn and S the system part; this is exact where the one-example reading could guess.
  - {SYSTEM} (optional, in the system part) is the conversation's system message, else `default_system_message`
    (required then). A system part without {SYSTEM} is itself the default system message: a conversation's own
    system message, or `default_system_message`, is written in its place.
  - Each assistant turn must end on a token the model can stop on: when E does not start with one of the
    tokenizer's special tokens (an end-of-turn marker such as <|im_end|>), the EOS token is written right after
    {OUTPUT}.
"""

from __future__ import annotations

import json

from fasttune.errors import ConfigError

INPUT, OUTPUT, SYSTEM = "{INPUT}", "{OUTPUT}", "{SYSTEM}"


def is_placeholder_template(value) -> bool:
    """A plain-text template with {INPUT} and {OUTPUT} (not Jinja, not a built-in name)."""
    return (isinstance(value, str) and INPUT in value and OUTPUT in value and "{{" not in value
            and "{%" not in value)


def _common_start(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _repeated_turn(text: str) -> int | None:
    """Start of the longest final turn T (one {INPUT}, one {OUTPUT}) that the text also has right before it."""
    for start in range(len(text)):
        turn = text[start:]
        if turn.count(INPUT) == 1 and turn.count(OUTPUT) == 1 and text[:start].endswith(turn):
            return start - len(turn)
    return None


def parse(text: str) -> tuple[str, str, str, str, str]:
    """The template's parts: (system, user opening, user closing, assistant opening, assistant closing).

    Raises: ConfigError for a text whose placeholders are not one or two {INPUT} ... {OUTPUT} pairs in that order
        with at most one {SYSTEM} before them, or whose two examples are not written the same way.
    """
    n = text.count(INPUT)
    order = [p for i in range(len(text)) for p in (INPUT, OUTPUT, SYSTEM) if text.startswith(p, i)]
    expected = [INPUT, OUTPUT] * n
    if n not in (1, 2) or [p for p in order if p != SYSTEM] != expected or order.count(SYSTEM) > 1 \
            or (SYSTEM in order and order[0] != SYSTEM):
        raise ConfigError(
            f"chat_template={text!r} is not a template this reads: write the conversation once (or twice, the same "
            "way) with {INPUT} where the user's message goes and {OUTPUT} where the reply goes, in that order, and "
            "at most one {SYSTEM} before them, e.g. '{SYSTEM}\\n\\n### Task:\\n{INPUT}\\n\\n### Reply:\\n{OUTPUT}'. "
            "Or pass a built-in template name or a Jinja template.")
    if n == 2:
        start = _repeated_turn(text)
        if start is None:
            raise ConfigError(
                f"chat_template={text!r} has two examples that are not written the same way. The second "
                "{INPUT} ... {OUTPUT} turn must repeat the first exactly (only the system part comes before it).")
        system, turn = text[:start], text[start:start + (len(text) - start) // 2]
        user_open, rest = turn.split(INPUT)
        middle, after = rest.split(OUTPUT)
    else:
        before, rest = text.split(INPUT)
        middle, after = rest.split(OUTPUT)
        system, user_open = before, ""
    user_close, assistant_open = ("", middle)
    if after and middle.startswith(after):
        user_close, assistant_open = after, middle[len(after):]
    if n == 1:
        head = before.split(SYSTEM)[-1]  # the user's turn starts after {SYSTEM}
        offset = len(before) - len(head)
        best, at = 0, None
        for i in range(len(head)):
            k = _common_start(head[i:], assistant_open)
            if k >= best and head[i:i + k].strip():  # a shared beginning of whitespace alone says nothing
                best, at = k, i
        at = 0 if at is None else at
        if SYSTEM not in before and at == 0:
            system, user_open = "", before
        else:
            system, user_open = before[:offset + at], before[offset + at:]
    return system, user_open, user_close, assistant_open, after


def to_jinja(text: str, tokenizer, default_system_message: str | None = None) -> str:
    """The Jinja chat template for a placeholder template (see the module docstring).

    Args: text: the template with {INPUT}/{OUTPUT} (and optionally {SYSTEM}); tokenizer: its special tokens decide
        whether an EOS token must follow {OUTPUT}; default_system_message: the system message for conversations
        without one (required when the template has {SYSTEM}).
    Raises: ConfigError as `parse`, when an EOS token is needed and the tokenizer has none, or for a {SYSTEM}
        template without default_system_message.
    """
    system, user_open, user_close, assistant_open, assistant_close = parse(text)
    if SYSTEM in system and default_system_message is None:
        raise ConfigError(f"chat_template={text!r} has a {{SYSTEM}} part: give the system message for conversations "
                          "without one (default_system_message= in apply_chat_template, system_message= in "
                          "get_chat_template).")
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    ends_on_marker = any(assistant_close.startswith(t) for t in specials)
    if not ends_on_marker and not getattr(tokenizer, "eos_token", None):
        raise ConfigError(f"chat_template={text!r}: nothing after {{OUTPUT}} is a special token the model could stop "
                          "on, and the tokenizer has no EOS token to add there. Write an end-of-turn token after "
                          "{OUTPUT}, or set tokenizer.eos_token.")
    q = json.dumps  # a JSON string literal is a valid Jinja string literal
    eos = "" if ends_on_marker else " + eos_token"
    # A system part without {SYSTEM} is itself the default system message: a given one takes its place.
    if SYSTEM in system:
        before, after = system.split(SYSTEM)
        default = before + default_system_message + after
    else:
        before, after = "", ""
        default = system if default_system_message is None else default_system_message
    with_message = f"{{{{ {q(before)} + messages[0]['content'] + {q(after)} }}}}"
    without = f"{{{{ {q(default)} }}}}"
    return (
        "{% if messages and messages[0]['role'] == 'system' %}" + with_message
        + "{% set loop_messages = messages[1:] %}{% else %}" + without + "{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        f"{{% if message['role'] == 'user' %}}{{{{ {q(user_open)} + message['content'] + {q(user_close)} }}}}"
        f"{{% elif message['role'] == 'assistant' %}}"
        f"{{{{ {q(assistant_open)} + message['content']{eos} + {q(assistant_close)} }}}}"
        "{% else %}{{ raise_exception('This chat template has user and assistant turns only, not ' ~ "
        "message['role'] ~ '.') }}{% endif %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {q(assistant_open)} }}}}{{% endif %}}"
    )
