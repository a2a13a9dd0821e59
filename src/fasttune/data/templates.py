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

`END_OF_TURN` names each format's end-of-turn token (what `get_chat_template(map_eos_token=True)` makes the EOS), and
`with_mapping` wraps a template so it also reads rows with other keys and role names (ShareGPT's from/value).
"""

from __future__ import annotations

import json

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

# Llama 3.1: every conversation opens with a system header that states the knowledge cut-off and a date (the
# format's fixed defaults), followed by the system message when there is one.
LLAMA_3_1 = (
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n' + system + '<|eot_id|>' }}"
    "{% for message in turns %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
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

# Phi-4: ChatML markers with <|im_sep|> between the role and the content, and no newline between turns.
PHI_4 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Zephyr: <|role|> headers written as plain text; every turn ends with the EOS token.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Vicuna v1.1: a system sentence (ours when the conversation has none), then "USER: ... ASSISTANT: ...</s>".
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + ' ' }}{% set turns = messages[1:] %}"
    "{% else %}"
    "{{ 'A conversation between a user and an AI assistant that answers accurately and politely. ' }}"
    "{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('The vicuna template supports only system, user and assistant roles.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A plain template without special tokens: ">>> User: " / ">>> Assistant: " lines, EOS after each answer.
UNSLOTH = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n' }}{% set turns = messages[1:] %}"
    "{% else %}{{ 'You are a helpful assistant.\n' }}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '>>> User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '>>> Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ raise_exception('The unsloth template supports only system, user and assistant roles.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '>>> Assistant: ' }}{% endif %}"
)

# Gemma 4: `<|turn>ROLE\n ... <turn|>\n` turns, the assistant's role written `model`, a system turn first when there
# is a system message or `enable_thinking=True` (which opens it with `<|think|>`); the generation prompt opens a
# model turn. Assistant contents are written as given (Google's template also drops `<|channel>...<channel|>`
# thinking spans from earlier model turns; training rows keep what they hold).
_GEMMA_4_TURNS = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% if system is not none or enable_thinking %}"
    "{{ '<|turn>system\n' + ('<|think|>\n' if enable_thinking else '') + (system or '') + '<turn|>\n' }}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\n' + (message['content'] | trim) + '<turn|>\n' }}"
    "{% endfor %}"
)
GEMMA_4 = _GEMMA_4_TURNS + "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
# Gemma 4 as Google's template prompts for generation: with thinking off, an empty thought channel after the model
# header (so the model answers without thinking). Not prefix-stable against the training render (whose model turns
# have no channel), so train_on_responses_only=True names it; the peer's notebooks mask by markers instead.
GEMMA_4_THINKING = _GEMMA_4_TURNS + (
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}"
    "{% if not enable_thinking %}{{ '<|channel>thought\n<channel|>' }}{% endif %}{% endif %}"
)

# Qwen3 Thinking (2507): ChatML whose assistant turns hold `<think>\nREASONING\n</think>\n\nANSWER`, the reasoning
# from `reasoning_content` or from a `<think>...</think>` part of the content; the generation prompt opens the
# thinking. Every assistant turn keeps its block (Qwen's template drops it from turns before the last question; kept
# here so the template is prefix-stable for train_on_responses_only).
QWEN_3_THINKING = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% set reasoning = message.get('reasoning_content') or '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>assistant\n<think>\n' + (reasoning | trim) + '\n</think>\n\n' + (content | trim)"
    " + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)

# Liquid LFM2 / LFM2.5: the BOS token, then plain ChatML.
LFM_2 = "{{ bos_token }}" + _CHATML_TURNS

# Llama 2 chat: each user turn in [INST] ... [/INST] after the BOS token, a system message inside the first one
# between <<SYS>> marks; the answer follows with the EOS token.
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + (messages[0]['content'] | trim) + '\n<</SYS>>\n\n' %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token }}{{ '[INST] ' + (system if loop.first else '') + (message['content'] | trim) + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('The llama template supports only system, user and assistant roles.') }}"
    "{% endif %}"
    "{% endfor %}"
)

# The first Vicuna format: a system sentence (Vicuna's own when there is none), then "### Human: ..." and
# "### Assistant: ..." lines, each answer closed by the EOS token.
VICUNA_OLD = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n' }}{% set turns = messages[1:] %}"
    "{% else %}{{ \"A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.\n\" }}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ raise_exception('The vicuna_old template supports only system, user and assistant roles.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)

# OpenChat / Starling: "GPT4 Correct ROLE: ...<|end_of_turn|>" for every role, after the BOS token.
STARLING = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ 'GPT4 Correct ' + (message['role'] | title) + ': ' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama-3": LLAMA_3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "qwen-2.5": QWEN_2_5,
    "phi-3": PHI_3,
    "alpaca": ALPACA,
    "llama-3.1": LLAMA_3_1,
    "qwen-3": CHATML,  # Qwen 3 without thinking: plain ChatML, no default system message
    "phi-4": PHI_4,
    "zephyr": ZEPHYR,
    "vicuna": VICUNA,
    "unsloth": UNSLOTH,
    "gemma-4": GEMMA_4,
    "gemma-4-thinking": GEMMA_4_THINKING,
    "qwen-3-thinking": QWEN_3_THINKING,
    "lfm-2": LFM_2,
    "llama": LLAMA_2,
    "vicuna-old": VICUNA_OLD,
    "starling": STARLING,
    "gemma-chatml": LFM_2,  # the BOS token, then ChatML (Gemma tokenizers with ChatML markers)
}
# Templates whose generation prompt is not where the training render's assistant turn starts (see GEMMA_4_THINKING)
NOT_PREFIX_STABLE = frozenset({"gemma-4-thinking"})

# Markers each template writes literally that must be single tokens of the tokenizer. Templates that use
# `bos_token`/`eos_token` need the tokenizer to define those (checked separately).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen-2.5": ("<|im_start|>", "<|im_end|>"),
    "qwen-3": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama-3.1": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "phi-4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    "alpaca": (),
    "zephyr": (),
    "vicuna": (),
    "unsloth": (),
    "gemma-4": ("<|turn>", "<turn|>"),
    "gemma-4-thinking": ("<|turn>", "<turn|>", "<|channel>", "<channel|>"),
    "qwen-3-thinking": ("<|im_start|>", "<|im_end|>"),
    "lfm-2": ("<|im_start|>", "<|im_end|>"),
    "llama": (),
    "vicuna-old": (),
    "starling": ("<|end_of_turn|>",),
    "gemma-chatml": ("<|im_start|>", "<|im_end|>"),
}
TEMPLATE_SPECIAL: dict[str, tuple[str, ...]] = {
    "mistral": ("bos_token", "eos_token"),
    "gemma": ("bos_token",),
    "alpaca": ("eos_token",),
    "zephyr": ("eos_token",),
    "vicuna": ("eos_token",),
    "unsloth": ("eos_token",),
    "gemma-4": ("bos_token",),
    "gemma-4-thinking": ("bos_token",),
    "lfm-2": ("bos_token",),
    "llama": ("bos_token", "eos_token"),
    "vicuna-old": ("bos_token", "eos_token"),
    "starling": ("bos_token",),
    "gemma-chatml": ("bos_token",),
}
# The token that ends an assistant turn, where the format has its own (None: the tokenizer's EOS ends it).
# `get_chat_template(..., map_eos_token=True)` makes it the tokenizer's eos_token, so generation stops there.
END_OF_TURN: dict[str, str | None] = {
    "chatml": "<|im_end|>", "qwen-2.5": "<|im_end|>", "qwen-3": "<|im_end|>", "phi-4": "<|im_end|>",
    "llama-3": "<|eot_id|>", "llama-3.1": "<|eot_id|>", "gemma": "<end_of_turn>", "phi-3": "<|end|>",
    "mistral": None, "alpaca": None, "zephyr": None, "vicuna": None, "unsloth": None,
    "gemma-4": "<turn|>", "gemma-4-thinking": "<turn|>", "qwen-3-thinking": "<|im_end|>", "lfm-2": "<|im_end|>",
    "llama": None, "vicuna-old": None, "starling": "<|end_of_turn|>", "gemma-chatml": "<|im_end|>",
}

_ALIASES = {"llama3": "llama-3", "llama-31": "llama-3.1", "llama3.1": "llama-3.1", "llama31": "llama-3.1",
            "qwen2.5": "qwen-2.5", "qwen-2-5": "qwen-2.5", "qwen25": "qwen-2.5", "qwen": "qwen-2.5",
            "qwen3": "qwen-3", "phi3": "phi-3", "phi4": "phi-4",
            "gemma2": "gemma", "gemma-2": "gemma", "gemma3": "gemma", "gemma-3": "gemma",
            # names Unsloth's get_chat_template takes for formats these already write: Llama 3.2 / 3.3 use 3.1's
            # turns, Phi-3.5 Phi-3's, Gemma 3n Gemma's, and Qwen3-Instruct(-2507) plain ChatML without a default
            # system message (tool calls are not rendered by ours)
            "llama-3.2": "llama-3.1", "llama-32": "llama-3.1", "llama3.2": "llama-3.1",
            "llama-3.3": "llama-3.1", "llama-33": "llama-3.1", "llama3.3": "llama-3.1",
            "phi-3.5": "phi-3", "phi-35": "phi-3", "phi3.5": "phi-3",
            "gemma-3n": "gemma", "gemma3n": "gemma", "qwen3-instruct": "qwen-3", "qwen-25": "qwen-2.5",
            # the peer's names for the newer formats
            "gemma4": "gemma-4", "gemma4-thinking": "gemma-4-thinking", "qwen3-thinking": "qwen-3-thinking",
            "lfm2": "lfm-2", "lfm-2.5": "lfm-2", "lfm2.5": "lfm-2", "llama-2": "llama", "vicuna old": "vicuna-old",
            "gemma2-chatml": "gemma-chatml", "yi-chat": "chatml"}


def names() -> str:
    """The built-in chat template names (CHAT_TEMPLATES), comma-separated, for messages."""
    return ", ".join(CHAT_TEMPLATES)


def template_name(value: str) -> str | None:
    """The built-in name `value` refers to, or None when it is a literal Jinja template.

    Args: value: a name from CHAT_TEMPLATES or one of its aliases (case and `_`/`-` do not matter, e.g.
        "Llama3", "qwen2.5", "gemma-3"), or a Jinja string (anything containing `{{` or `{%`).
    Raises: ConfigError for a name that is neither, listing the built-in names.
    """
    if "{{" in value or "{%" in value:
        return None
    key = value.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in ("gpt-oss", "gptoss"):  # harmony: channels, a dated system block and tool calls, best left to its own
        raise ConfigError(f"chat_template={value!r}: gpt-oss checkpoints ship OpenAI's harmony template; keep the "
                          f"tokenizer's own (do not call get_chat_template, or pass chat_template=None).")
    if key not in CHAT_TEMPLATES:
        raise ConfigError(
            f"chat_template={value!r} is not a known template name. Use one of: {names()} "
            f"(aliases: {', '.join(_ALIASES)}); or pass a Jinja template string."
        )
    return key


def resolve_chat_template(value: str) -> str:
    """A built-in name (see CHAT_TEMPLATES) or a literal Jinja template -> the Jinja string."""
    name = template_name(value)
    return value if name is None else CHAT_TEMPLATES[name]


def missing_template_tokens(name: str, tokenizer) -> list[str]:
    """The markers (and bos_token/eos_token attributes) the built-in template `name` needs that `tokenizer` lacks."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
    return missing + [s for s in TEMPLATE_SPECIAL.get(name, ()) if getattr(tokenizer, s, None) is None]


def check_template_tokens(value: str, tokenizer, error: type[Exception] = DataError) -> None:
    """Raise `error` if the tokenizer lacks the special tokens the named template writes (a Jinja string passes)."""
    name = template_name(value)
    if name is None or tokenizer is None:
        return
    missing = missing_template_tokens(name, tokenizer)
    if missing:
        raise error(
            f"The '{name}' chat template needs {', '.join(missing)}, which the tokenizer does not have. "
            f"Add the tokens with FastLanguageModel.add_new_tokens(model, tokenizer, [...]) (this also resizes "
            f"the embeddings, which then need training: add 'embed_tokens' and 'lm_head' to modules_to_save), "
            f"or choose a template whose markers the tokenizer has (one of: {names()})."
        )


def render_chat(tokenizer, messages: list[dict], where: str, *, add_generation_prompt: bool = False,
                chat_template: str | None = None, **template_kwargs) -> str:
    """One conversation rendered to text with a chat template (`tokenizer.apply_chat_template(tokenize=False)`).

    Args:
        tokenizer: a transformers tokenizer; its own chat template renders unless `chat_template` is given.
        messages: validated {role, content} dicts (formats.message_list / formats.validate_messages).
        where: the row, for messages (formats.row_label).
        add_generation_prompt: append the header that opens an assistant turn (for a prompt to complete).
        chat_template: a Jinja string that replaces the tokenizer's template (resolve_chat_template's result).
        template_kwargs: further template variables (e.g. `tools`, `documents`).
    Returns: the rendered text, with whatever special tokens (BOS, turn markers) the template writes; tokenize it
        with add_special_tokens=False, as apply_chat_template(tokenize=True) does.
    Raises: DataError naming `where` when the template fails (Jinja's TemplateError, raise_exception in the
        template, ...) or returns something other than a string.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, **template_kwargs)
    except Exception as e:  # jinja raises TemplateError (incl. raise_exception in templates) and others
        whose = "the tokenizer's chat template" if chat_template is None else "the chat template"
        raise DataError(f"{where}: {whose} could not render this conversation ({type(e).__name__}: {e}). Check the "
                        "roles and their order (many templates need user/assistant turns to alternate).") from e
    if not isinstance(text, str):
        raise DataError(f"{where}: the chat template returned {type(text).__name__}, expected a string.")
    return text


STANDARD_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def with_mapping(template: str, mapping: dict | None = None, system_message: str | None = None,
                 media: dict | None = None) -> str:
    """`template` behind a prelude that reads messages with other keys/role names, takes content given as a list of
    typed parts (transformers' multimodal message form, {"type": "text", "text": ...}; text parts are joined, a part
    whose type is a key of `media` ({"image": placeholder, "audio": ...}, a vision-language processor's) becomes
    that placeholder text, any other part is an error), and adds a default system message.

    Args:
        template: a Jinja chat template that reads `message['role']`/`message['content']` with the roles
            system/user/assistant and string content.
        mapping: {"role": key of the role, "content": key of the text, "user": the user's role name,
            "assistant": the assistant's role name, optional "system"}, e.g. ShareGPT's
            {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}. Messages that carry the
            standard keys instead still render. None: the standard keys.
        system_message: when given, conversations that do not start with a system message get this one.
    Returns: the Jinja string.
    Raises: ConfigError when `mapping` lacks one of its four keys or holds a non-string value.
    """
    mapping = dict(STANDARD_MAPPING if mapping is None else mapping)
    missing = [k for k in STANDARD_MAPPING if k not in mapping]
    if missing or not all(isinstance(v, str) and v for v in mapping.values()):
        raise ConfigError(
            f"mapping={mapping!r} is invalid: it needs the string keys 'role', 'content', 'user' and 'assistant' "
            "(optionally 'system'), e.g. {'role': 'from', 'content': 'value', 'user': 'human', 'assistant': 'gpt'}."
        )
    if system_message is not None and not isinstance(system_message, str):
        raise ConfigError(f"system_message must be a string or None, not a {type(system_message).__name__}.")
    mapping.setdefault("system", "system")
    q = json.dumps  # a JSON string literal is a valid Jinja string literal
    roles = "{" + ", ".join(f"{q(mapping[r])}: {q(r)}" for r in ("system", "user", "assistant")) + "}"
    # Plain tags without whitespace control: the template's own first characters must stay as they are.
    prelude = (
        "{% set _ns = namespace(turns=[]) %}"
        "{% for _m in messages %}"
        f"{{% set _role = _m.get({q(mapping['role'])}) if _m.get({q(mapping['role'])}) is not none "
        "else _m.get('role') %}"
        f"{{% set _text = _m.get({q(mapping['content'])}) if _m.get({q(mapping['content'])}) is not none "
        "else _m.get('content') %}"
        "{% if _text is not string and _text is iterable and _text is not mapping %}"
        "{% set _parts = namespace(text='') %}"
        "{% for _p in _text %}"
        "{% if _p is mapping and _p.get('type') == 'text' %}{% set _parts.text = _parts.text + _p.get('text') %}"
        f"{{% elif _p is mapping and _p.get('type') in {q(dict(media or {}))} %}}"
        f"{{% set _parts.text = _parts.text + {q(dict(media or {}))}[_p.get('type')] %}}"
        "{% else %}{{ raise_exception('This chat template renders text only; a message has a content part of "
        "type ' ~ (_p.get('type') if _p is mapping else _p) ~ '.') }}{% endif %}"
        "{% endfor %}"
        "{% set _text = _parts.text %}"
        "{% endif %}"
        f"{{% set _ns.turns = _ns.turns + [{{'role': {roles}.get(_role, _role), 'content': _text}}] %}}"
        "{% endfor %}"
    )
    if system_message is not None:
        prelude += (
            "{% if _ns.turns | length == 0 or _ns.turns[0]['role'] != 'system' %}"
            f"{{% set _ns.turns = [{{'role': 'system', 'content': {q(system_message)}}}] + _ns.turns %}}"
            "{% endif %}"
        )
    return prelude + "{% set messages = _ns.turns %}" + template
