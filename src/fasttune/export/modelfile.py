"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go template) and stop tokens.

The Jinja chat template is mapped only when that is exact: it is rendered with marker contents to read off, per
role, the text before and after a message, the generation prompt, and any default system block (shown when the
conversation has no system message). That wrapper model is then checked against the Jinja template on a set of
conversations; if any rendering differs (templates with role-dependent logic beyond that, e.g. Llama 2 folding
the system prompt into the first user turn), the Modelfile says so in a comment instead of guessing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

MARK = {"system": "\x02SYSTEM\x03", "user": "\x02USER\x03", "assistant": "\x02ASSISTANT\x03"}
ROLES = ("system", "user", "assistant")
# Conversations on which the wrapper model must reproduce the Jinja template exactly.
CHECKS = [["user"], ["user", "assistant"], ["user", "assistant", "user"], ["system", "user"],
          ["system", "user", "assistant", "user"], ["system", "user", "assistant", "user", "assistant"]]


@dataclass
class ChatWrappers:
    """A chat template as literal text around each message: `prefix` and `suffix` map role -> text."""

    start: str  # text before everything (e.g. the BOS token's text)
    default_system: str  # shown when the first message is not a system message
    prefix: dict
    suffix: dict
    generation_prompt: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation (dicts with "role" and "content") as text, as apply_chat_template(tokenize=False)
        would render it if these wrappers are exact."""
        out = self.start
        if not messages or messages[0]["role"] != "system":
            out += self.default_system
        for m in messages:
            out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return out + (self.generation_prompt if add_generation_prompt else "")


def _conv(roles, n=0):
    return [{"role": r, "content": MARK[r] + str(i + n)} for i, r in enumerate(roles)]


def _between(text: str, a: str, b: str) -> str:
    return text[text.index(a) + len(a):text.index(b)]


def chat_wrappers(tokenizer, split_bos: bool = False) -> ChatWrappers | None:
    """The per-role wrapper model of the tokenizer's chat template, or None when it cannot be read off exactly.
    split_bos: a leading BOS text goes to `start` (to be left out where BOS is added by the tokenizer)."""
    def render(messages, gen=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        suffix = {}
        for r in ROLES:
            text = render(_conv([r]))
            suffix[r] = text[text.index(MARK[r] + "0") + len(MARK[r] + "0"):]
        one_user = render(_conv(["user"]))
        generation_prompt = render(_conv(["user"]), True).removeprefix(one_user)
        between_ua = _between(render(_conv(["user", "assistant"])), MARK["user"] + "0", MARK["assistant"] + "1")
        between_au = _between(render(_conv(["user", "assistant", "user"])), MARK["assistant"] + "1", MARK["user"] + "2")
        if not (between_ua.startswith(suffix["user"]) and between_au.startswith(suffix["assistant"])):
            return None
        prefix = {"assistant": between_ua[len(suffix["user"]):], "user": between_au[len(suffix["assistant"]):]}
        head_user = one_user[:one_user.index(MARK["user"])]
        head_system = render(_conv(["system"]))
        head_system = head_system[:head_system.index(MARK["system"])]
        if not head_user.endswith(prefix["user"]):
            return None
        bos = getattr(tokenizer, "bos_token", None) or ""
        start = bos if split_bos and bos and head_user.startswith(bos) and head_system.startswith(bos) else ""
        prefix["system"] = head_system[len(start):]
        default_system = head_user[len(start):len(head_user) - len(prefix["user"])]
        wrappers = ChatWrappers(start, default_system, prefix, suffix, generation_prompt)
        for roles in CHECKS:
            messages = _conv(roles)
            for gen in ((True, False) if roles[-1] == "user" else (False,)):
                if wrappers.render(messages, gen) != render(messages, gen):
                    return None
    except Exception:  # templates may raise on role orders they do not support: then there is no exact mapping
        return None
    return wrappers


def go_template(w: ChatWrappers) -> str | None:
    """Ollama's Go template for the wrappers (literal text only, no whitespace trimming), or None if the literal
    text would be read as template syntax. `start` (a BOS that llama.cpp adds itself) is left out."""
    parts = [w.default_system, *w.prefix.values(), *w.suffix.values(), w.generation_prompt]
    if any("{{" in p or "}}" in p or '"""' in p for p in parts):
        return None
    out = ""
    if w.default_system:
        out += '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + w.default_system + "{{ end }}"
    out += "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    branches = [f'{"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{w.prefix[r]}{{{{ .Content }}}}{w.suffix[r]}'
                for i, r in enumerate(ROLES)]
    out += "{{ " + "{{ ".join(branches) + "{{ end }}"
    out += '{{ if and $last (ne .Role "assistant") }}' + w.generation_prompt + "{{ end }}{{ end }}"
    return out


def stop_strings(tokenizer, w: ChatWrappers | None) -> list[str]:
    """The EOS text and any special token that opens the assistant's closing text (e.g. <|im_end|>)."""
    stops = []
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    if w is not None:
        closing = w.suffix["assistant"].lstrip()
        stops += [t for t in sorted(set(specials), key=len, reverse=True) if closing.startswith(t)][:1]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return list(dict.fromkeys(stops))


def ollama_modelfile(gguf_name: str, tokenizer, projector: str | None = None) -> str:
    """The text of an Ollama Modelfile for `gguf_name` (a file next to it): FROM, a second FROM for a
    vision-language model's `projector` (its mmproj file, beside it), a TEMPLATE when the chat template maps
    exactly (otherwise a comment saying why there is none), and PARAMETER stop lines. Format: Ollama's
    docs/modelfile.md and docs/template.md."""
    from fasttune.export.gguf_vocab import _adds_bos_eos

    lines = [f"FROM ./{gguf_name}", *([f"FROM ./{projector}"] if projector else []), ""]
    # llama.cpp adds BOS itself when the tokenizer does; the template then must not add a second one.
    adds_bos = _adds_bos_eos(tokenizer)[0]
    wrappers = chat_wrappers(tokenizer, split_bos=adds_bos) if getattr(tokenizer, "chat_template", None) else None
    template = go_template(wrappers) if wrappers is not None else None
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    elif getattr(tokenizer, "chat_template", None):
        lines += ["# TEMPLATE: this model's chat template could not be mapped to an Ollama Go template exactly, so",
                  "# none is set (Ollama then sends raw prompts). Write one by hand that renders the same text as",
                  "# tokenizer_config.json's chat_template; see "
                  "https://github.com/ollama/ollama/blob/main/docs/template.md",
                  ""]
    else:
        lines += ["# No chat template: the tokenizer has none, so Ollama sends raw prompts.", ""]
    for stop in stop_strings(tokenizer, wrappers):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"
