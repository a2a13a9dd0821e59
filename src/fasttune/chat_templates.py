"""Chat-template and dataset helpers under the names users of Unsloth's `chat_templates` module import:

    from fasttune.chat_templates import (get_chat_template, standardize_sharegpt, standardize_data_formats,
                                         to_sharegpt, apply_chat_template, train_on_responses_only)

    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    dataset = standardize_sharegpt(dataset)                      # {from, value} -> {role, content}
    dataset = apply_chat_template(dataset, tokenizer)            # -> a "text" column
    trainer = train_on_responses_only(SFTTrainer(...),
                                      instruction_part="<|start_header_id|>user<|end_header_id|>\\n\\n",
                                      response_part="<|start_header_id|>assistant<|end_header_id|>\\n\\n")

A thin layer: the work is done in fasttune.data (templates, set_template, standardize, tabular, render,
responses_only) and fasttune.train.responses_only.
"""

from __future__ import annotations

from fasttune.data.render import render_dataset
from fasttune.data.set_template import SHAREGPT_MAPPING, set_chat_template
from fasttune.data.standardize import standardize_data_formats, standardize_sharegpt
from fasttune.data.tabular import to_sharegpt
from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.train.responses_only import train_on_responses_only

__all__ = ["get_chat_template", "standardize_sharegpt", "standardize_data_formats", "to_sharegpt",
           "apply_chat_template", "train_on_responses_only", "CHAT_TEMPLATES"]


def get_chat_template(tokenizer, chat_template="chatml", mapping: dict | None = None, map_eos_token: bool = True,
                      system_message: str | None = None):
    """Give `tokenizer` a chat template; returns the same tokenizer, changed.

    Args:
        tokenizer: a transformers tokenizer.
        chat_template: a name (llama-3, llama3, llama-3.1, llama-31, llama-3.2, llama-3.3, chatml, mistral, gemma,
            gemma2, gemma-3, gemma3, gemma-3n, gemma-4, gemma4, gemma-4-thinking, qwen-2.5, qwen2.5, qwen-3, qwen3,
            qwen3-instruct, qwen-3-thinking, qwen3-thinking, lfm-2, lfm-2.5, phi-3, phi-3.5, phi-4, zephyr, alpaca,
            vicuna, vicuna_old, llama (Llama 2), starling, gemma_chatml, yi-chat, unsloth), a Jinja string, or a
            (Jinja string, end-of-turn token) pair.
        mapping: the keys and role names of the rows, e.g. {"role": "from", "content": "value", "user": "human",
            "assistant": "gpt"} (the default); rows with the standard role/content keys always render too.
        map_eos_token: make the format's end-of-turn marker (e.g. <|im_end|>) the tokenizer's EOS token.
        system_message: a system message for conversations that have none.
    Raises: ConfigError for an unknown name (listing them), "gpt-oss" (keep its own harmony template), or markers
        that are not tokens of the vocabulary.
    """
    return set_chat_template(tokenizer, chat_template, SHAREGPT_MAPPING if mapping is None else mapping,
                             map_eos_token, system_message)


def apply_chat_template(dataset, tokenizer, chat_template: str | None = None,
                        default_system_message: str | None = None):
    """Render each row's `conversations`/`messages` into a `text` column with the tokenizer's (or the given) template.

    Args: dataset: a datasets.Dataset (or DatasetDict); tokenizer: its chat template renders the rows unless
        `chat_template` is given: a built-in name, a Jinja string, or plain text with {INPUT}/{OUTPUT} (and
        optionally {SYSTEM}) placeholders (see fasttune.data.placeholder_template). A given template also becomes
        the tokenizer's (as get_chat_template(..., map_eos_token=False) would set it), so generation, the saved
        tokenizer and a GGUF's Modelfile use the format the model was trained on.
        default_system_message: added to conversations without a system message (for a placeholder template:
        what its {SYSTEM} part holds for them).
    Returns: the dataset with `text` in place of the conversation column.
    Raises: ConfigError without a template or for a template that cannot be used; DataError for a missing column or
        a bad row (naming it).
    """
    if chat_template is None:
        return render_dataset(dataset, tokenizer, None, default_system_message)
    set_chat_template(tokenizer, chat_template, SHAREGPT_MAPPING, map_eos_token=False,
                      system_message=default_system_message)
    return render_dataset(dataset, tokenizer)

