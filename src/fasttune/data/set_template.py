"""Put a chat template on a tokenizer: a built-in one by name, a Jinja string, or (Jinja, end-of-turn token).

The template can read messages with other keys (ShareGPT's from/value and human/gpt) through a mapping, can add a
default system message, and its end-of-turn marker can become the tokenizer's EOS token, so generation stops at the
end of an answer. Tokens are never added to the vocabulary here (see fasttune.data.templates).
"""

from __future__ import annotations

from fasttune.data import placeholder_template, templates
from fasttune.data.placeholder_template import is_placeholder_template
from fasttune.errors import ConfigError

SHAREGPT_MAPPING = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}


def set_chat_template(tokenizer, chat_template="chatml", mapping: dict | None = None, map_eos_token: bool = True,
                      system_message: str | None = None):
    """Set `tokenizer.chat_template` (and, with map_eos_token, its EOS token); returns the same tokenizer.

    Args:
        tokenizer: a transformers tokenizer, or a vision-language processor (its tokenizer gets the template and
            EOS too).
        chat_template: a built-in name (fasttune.data.templates.CHAT_TEMPLATES and aliases such as "llama3",
            "qwen2.5", "gemma3"), a Jinja string, a (Jinja string, end-of-turn token) pair, or plain text with
            {INPUT}/{OUTPUT} (and optionally {SYSTEM}) placeholders (fasttune.data.placeholder_template).
        mapping: keys and role names the rows use (see templates.with_mapping); None: ShareGPT's, and rows with the
            standard role/content keys render too.
        map_eos_token: make the format's end-of-turn marker (e.g. "<|im_end|>", "<|eot_id|>") the EOS token.
            Formats that end answers with the EOS token itself (mistral, alpaca, zephyr, vicuna, unsloth) keep it.
        system_message: a system message for conversations that have none (with placeholders: what {SYSTEM}
            holds for them).
    Returns: the tokenizer, changed in place.
    Raises: ConfigError for an unknown name (listing the names), a tokenizer that lacks the template's special tokens
        or its end-of-turn token (add them with FastLanguageModel.add_new_tokens first, or pick another template),
        or a bad mapping. The tokenizer is left unchanged when it raises.
    """
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise ConfigError(f"get_chat_template needs a transformers tokenizer, got {type(tokenizer).__name__}.")
    end_of_turn = None
    if isinstance(chat_template, (tuple, list)):
        if len(chat_template) != 2 or not all(isinstance(v, str) for v in chat_template):
            raise ConfigError("chat_template as a pair must be (Jinja template string, end-of-turn token string), "
                              f"got {chat_template!r}.")
        jinja, end_of_turn = chat_template
        templates.check_template_tokens(jinja, tokenizer, error=ConfigError)  # a name may stand for the Jinja
        jinja = templates.resolve_chat_template(jinja)
    elif is_placeholder_template(chat_template):
        jinja = placeholder_template.to_jinja(chat_template, tokenizer, system_message)
        system_message = None  # written by the template itself: its {SYSTEM} part holds it
    elif isinstance(chat_template, str):
        name = templates.template_name(chat_template)
        templates.check_template_tokens(chat_template, tokenizer, error=ConfigError)
        jinja = chat_template if name is None else templates.CHAT_TEMPLATES[name]
        end_of_turn = None if name is None else templates.END_OF_TURN[name]
    else:
        raise ConfigError(f"chat_template must be a template name (one of: {templates.names()}), a Jinja string or a "
                          f"(Jinja string, end-of-turn token) pair, not a {type(chat_template).__name__}.")
    jinja = templates.with_mapping(jinja, SHAREGPT_MAPPING if mapping is None else mapping, system_message,
                                   media_placeholders(tokenizer))
    if map_eos_token and end_of_turn is not None and end_of_turn not in tokenizer.get_vocab():
        raise ConfigError(
            f"map_eos_token=True makes the end-of-turn marker {end_of_turn!r} the EOS token, but it is not a token of "
            "this tokenizer's vocabulary. Add it first with FastLanguageModel.add_new_tokens(model, tokenizer, "
            f"[{end_of_turn!r}]) (and train 'embed_tokens'/'lm_head' via modules_to_save), pick another template, or "
            "pass map_eos_token=False."
        )
    inner = getattr(tokenizer, "tokenizer", None)  # a vision-language processor: its tokenizer too, so the EOS
    for tok in (tokenizer,) if inner is None else (tokenizer, inner):  # the trainers and generate read agrees
        tok.chat_template = jinja
    if map_eos_token and end_of_turn is not None:
        (tokenizer if inner is None else inner).eos_token = end_of_turn
    return tokenizer


def media_placeholders(processor) -> dict:
    """{"image": text, "audio": text} a vision-language processor's expansion looks for where an image / clip goes
    (Qwen's image token inside its vision start / end marks, as Qwen's templates write it); {} for a tokenizer."""
    image = getattr(processor, "image_token", None)
    if not isinstance(image, str):
        return {}
    vocab = processor.get_vocab()
    if image == "<|image_pad|>" and "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        image = "<|vision_start|>" + image + "<|vision_end|>"
    audio = getattr(processor, "audio_token", None)
    return {"image": image, **({"audio": audio} if isinstance(audio, str) else {})}

