"""Built-in chat templates for tokenizers that have none (base models), selected by name.

Each is a Jinja string in the form `tokenizer.apply_chat_template` renders (it gets `messages`,
`add_generation_prompt` and the tokenizer's special tokens such as `bos_token`/`eos_token`), written from the
public description of each format. Every template:
  - supports `add_generation_prompt` (it appends the header that opens an assistant turn), and is prefix-stable,
    so `train_on_responses_only` can derive the assistant spans from it;
  - ends each assistant turn with the format's end-of-turn marker (the EOS token where the format has no
    dedicated one), which is part of the target, so the model learns to stop.

The markers a template writes as single special tokens (e.g. `<|im_start|>`) must already be tokens of the
tokenizer: otherwise they would be split into plain text pieces and the model would learn a marker that
generation never stops on. `check_template_tokens` names the missing ones; add them with
`FastLanguageModel.add_new_tokens(model, tokenizer, [...])` (which also resizes the embeddings) or pick a
template whose markers the tokenizer has. We do not add tokens silently: that changes the vocabulary and the
embedding matrix, which the user must decide to train (and save) on purpose.
"""

from __future__ import annotations

from fasttune.errors import ConfigError, DataError

_CHATML_TURNS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML = _CHATML_TURNS

# ChatML with Qwen2.5's default system message when the conversation has none.
QWEN_2_5 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + _CHATML_TURNS
)

LLAMA_3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral [INST] format: a system message is prepended to the first user turn; the model answers right after
# [/INST], so the generation prompt adds nothing.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('The mistral template supports only system, user and assistant roles.') }}"
    "{% endif %}"
    "{% endfor %}"
)

# Gemma: roles user/model; a system message is prepended to the first user turn.
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + (message['content'] | trim)"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI_3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Alpaca-style sections; the preamble (our wording) stands in when there is no system message.
ALPACA = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ 'The following is an instruction describing a task. Write a response that fulfils the request.\n\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ raise_exception('The alpaca template supports only system, user and assistant roles.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama-3": LLAMA_3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "qwen-2.5": QWEN_2_5,
    "phi-3": PHI_3,
    "alpaca": ALPACA,
}

# Markers each template writes literally that must be single tokens of the tokenizer. Templates that use
# `bos_token`/`eos_token` need the tokenizer to define those (checked separately).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen-2.5": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "alpaca": (),
}
TEMPLATE_SPECIAL: dict[str, tuple[str, ...]] = {
    "mistral": ("bos_token", "eos_token"),
    "gemma": ("bos_token",),
    "alpaca": ("eos_token",),
}

_ALIASES = {"llama3": "llama-3", "qwen2.5": "qwen-2.5", "qwen-2_5": "qwen-2.5", "qwen": "qwen-2.5",
            "phi3": "phi-3", "gemma-2": "gemma", "gemma-3": "gemma"}


def names() -> str:
    return ", ".join(CHAT_TEMPLATES)


def template_name(value: str) -> str | None:
    """The built-in name `value` refers to, or None when it is a literal Jinja template."""
    if "{{" in value or "{%" in value:
        return None
    key = value.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise ConfigError(
            f"chat_template={value!r} is not a known template name. Use one of: {names()}; "
            "or pass a Jinja template string."
        )
    return key


def resolve_chat_template(value: str) -> str:
    """A built-in name (see CHAT_TEMPLATES) or a literal Jinja template -> the Jinja string."""
    name = template_name(value)
    return value if name is None else CHAT_TEMPLATES[name]


def check_template_tokens(value: str, tokenizer) -> None:
    """Raise a DataError if the tokenizer lacks the special tokens the named template writes."""
    name = template_name(value)
    if name is None or tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
    missing += [s for s in TEMPLATE_SPECIAL.get(name, ()) if getattr(tokenizer, s, None) is None]
    if missing:
        raise DataError(
            f"The '{name}' chat template needs {', '.join(missing)}, which the tokenizer does not have. "
            f"Add the tokens with FastLanguageModel.add_new_tokens(model, tokenizer, [...]) (this also resizes "
            f"the embeddings, which then need training: add 'embed_tokens' and 'lm_head' to modules_to_save), "
            f"or choose a template whose markers the tokenizer has (one of: {names()})."
        )
