import json

import pytest

from fasttune.data import tokenize_rows
from fasttune.data.templates import CHAT_TEMPLATES, NOT_PREFIX_STABLE, TEMPLATE_TOKENS, resolve_chat_template
from fasttune.data.templates import END_OF_TURN as TEMPLATE_END_OF_TURN
from fasttune.errors import ConfigError, DataError
from fasttune.train.config import SFTConfig
from tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer

EOS = 256

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo."},
]
# What must follow each assistant message so the model learns to stop ({eos}: the tokenizer's EOS).
END_OF_TURN = {
    "chatml": "<|im_end|>", "qwen-2.5": "<|im_end|>", "qwen-3": "<|im_end|>", "llama-3": "<|eot_id|>",
    "llama-3.1": "<|eot_id|>", "mistral": "{eos}", "gemma": "<end_of_turn>", "phi-3": "<|end|>", "phi-4": "<|im_end|>",
    "alpaca": "{eos}", "zephyr": "{eos}", "vicuna": "{eos}", "unsloth": "{eos}", "gemma-4": "<turn|>",
    "gemma-4-thinking": "<turn|>", "qwen-3-thinking": "<|im_end|>", "lfm-2": "<|im_end|>", "llama": "{eos}",
    "vicuna-old": "{eos}", "starling": "<|end_of_turn|>", "gemma-chatml": "<|im_end|>",
}


@pytest.fixture(scope="module")
def bare_tokenizer():
    return make_tiny_tokenizer(chat_template=None)


def render(tok, name, messages, gen=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                   chat_template=resolve_chat_template(name))


def test_every_name_has_an_end_marker_entry():
    assert set(END_OF_TURN) == set(CHAT_TEMPLATES) == set(TEMPLATE_END_OF_TURN) == set(TEMPLATE_TOKENS)
    for name, marker in TEMPLATE_END_OF_TURN.items():  # the marker map_eos_token uses is the one turns end with
        assert END_OF_TURN[name] == (marker or "{eos}")


@pytest.mark.parametrize("name", sorted(set(CHAT_TEMPLATES) - NOT_PREFIX_STABLE))
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "no-system"])
def test_templates_are_prefix_stable_and_end_assistant_turns(bare_tokenizer, name, messages):
    tok = bare_tokenizer
    full = render(tok, name, messages)
    end_marker = END_OF_TURN[name].format(eos=tok.eos_token)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(tok, name, messages[:i], gen=True)
        end = render(tok, name, messages[: i + 1])
        assert full.startswith(end) and end.startswith(start)
        turn = end[len(start):].split("</think>")[-1]  # (Qwen3 Thinking: the turn's empty reasoning first)
        assert turn.lstrip().startswith(m["content"])  # the generation prompt opens the assistant turn
        assert turn.rstrip("\n").endswith(end_marker)
    for m in messages:
        assert m["content"] in full


def test_chatml_and_llama3_render_exactly(bare_tokenizer):
    msgs = CONVERSATION[1:3]
    assert render(bare_tokenizer, "chatml", msgs, gen=False) == (
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n")
    assert render(bare_tokenizer, "llama-3", msgs[:1], gen=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render(bare_tokenizer, "mistral", CONVERSATION[:3]) == (
        "[INST] Be brief.\n\nCapital of France? [/INST] Paris.<|endoftext|>")


def test_named_template_equals_the_tokenizers_own(bare_tokenizer, tiny_tokenizer):
    # The tiny tokenizer's own template is ChatML, so --chat-template chatml on the bare one gives the same ids.
    rows = [{"messages": CONVERSATION}]
    for responses_only in (False, True):
        ours = tokenize_rows(rows, bare_tokenizer, max_seq_length=512, chat_template="chatml",
                             train_on_responses_only=responses_only)
        own = tokenize_rows(rows, tiny_tokenizer, max_seq_length=512, train_on_responses_only=responses_only)
        assert ours == own


def test_chat_template_overrides_the_tokenizers(tiny_tokenizer):
    (ex,) = tokenize_rows([{"messages": CONVERSATION[1:3]}], tiny_tokenizer, max_seq_length=512,
                          chat_template="alpaca", train_on_responses_only=True)
    text = tiny_tokenizer.decode(ex["input_ids"])
    assert "### Instruction:\nCapital of France?" in text and "<|im_start|>" not in text
    targets = [t for t in ex["labels"] if t != -100]
    assert tiny_tokenizer.decode(targets) == "Paris.<|endoftext|>\n\n" and EOS in targets


def test_literal_jinja_template(bare_tokenizer):
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    (ex,) = tokenize_rows([{"messages": CONVERSATION[1:3]}], bare_tokenizer, max_seq_length=512,
                          chat_template=jinja)
    assert bare_tokenizer.decode(ex["input_ids"]) == "user: Capital of France?\nassistant: Paris.\n"


def test_alpaca_rows_use_the_chosen_template(bare_tokenizer):
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    (ex,) = tokenize_rows([row], bare_tokenizer, max_seq_length=512, chat_template="chatml")
    assert bare_tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>")


def test_messages_without_any_template_name_the_choices(bare_tokenizer):
    with pytest.raises(DataError, match="chat_template.*chatml, llama-3, mistral, gemma, qwen-2.5, phi-3, alpaca"):
        tokenize_rows([{"messages": CONVERSATION}], bare_tokenizer, max_seq_length=512)


@pytest.mark.parametrize("name, missing", [
    ("llama-3", "<|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>"),
    ("gemma", "<start_of_turn>, <end_of_turn>, bos_token"),
])
def test_missing_special_tokens_are_an_error(bare_tokenizer, name, missing):
    with pytest.raises(DataError, match="add_new_tokens") as e:
        tokenize_rows([{"messages": CONVERSATION}], bare_tokenizer, max_seq_length=512, chat_template=name)
    assert missing in str(e.value)


def test_text_rows_ignore_the_template(bare_tokenizer):
    (ex,) = tokenize_rows([{"text": "hi"}], bare_tokenizer, max_seq_length=64, chat_template="llama-3")
    assert ex["input_ids"] == [ord("h"), ord("i"), EOS]


def test_config_rejects_unknown_names():
    assert SFTConfig(chat_template="ChatML").chat_template == "ChatML"
    with pytest.raises(ConfigError, match="chatml, llama-3, mistral, gemma, qwen-2.5, phi-3, alpaca"):
        SFTConfig(chat_template="no-such-format")


def test_cli_chat_template_flag(tmp_path, capsys):
    from fasttune.cli import main
    from tiny import hf_model, save_hf

    model_dir = tmp_path / "base"
    save_hf(hf_model("llama", seed=0), model_dir, make_tiny_tokenizer(chat_template=None))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONVERSATION[1:3]}) for _ in range(4)))
    args = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "4"]
    assert main(args + ["--output-dir", str(tmp_path / "a")]) == 2  # no template: a clear error
    assert "--chat-template" in capsys.readouterr().err
    assert main(args + ["--output-dir", str(tmp_path / "b"), "--chat-template", "chatml"]) == 0
    from transformers import AutoTokenizer

    from fasttune.data.templates import resolve_chat_template

    saved = AutoTokenizer.from_pretrained(tmp_path / "b" / "adapter")  # the template travels with the adapter
    assert saved.chat_template == resolve_chat_template("chatml")
    assert main(args + ["--output-dir", str(tmp_path / "c"), "--chat-template", "no-such-format"]) == 2
    assert "chatml, llama-3" in capsys.readouterr().err


def test_mapping_renders_sharegpt_and_standard_rows_alike(bare_tokenizer):
    from fasttune.data.templates import with_mapping

    sharegpt = with_mapping(resolve_chat_template("chatml"),
                            {"role": "from", "content": "value", "user": "human", "assistant": "gpt"})
    rows = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert bare_tokenizer.apply_chat_template(rows, tokenize=False, chat_template=sharegpt) == expected
    assert render(bare_tokenizer, sharegpt, CONVERSATION[1:3]) == render(bare_tokenizer, "chatml", CONVERSATION[1:3])
    # Arrow gives every message the union of the keys, the absent ones None.
    arrow_rows = [{**r, "role": None, "content": None} for r in rows]
    assert bare_tokenizer.apply_chat_template(arrow_rows, tokenize=False, chat_template=sharegpt) == expected


def test_system_message_is_added_only_when_missing(bare_tokenizer):
    from fasttune.data.templates import with_mapping

    jinja = with_mapping(resolve_chat_template("chatml"), None, system_message="Be kind.")
    assert render(bare_tokenizer, jinja, CONVERSATION[1:2], gen=True) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(bare_tokenizer, jinja, CONVERSATION[:1]) == "<|im_start|>system\nBe brief.<|im_end|>\n"


@pytest.mark.parametrize("name", ["chatml", "gemma", "llama-3"])
def test_content_as_a_list_of_text_parts(bare_tokenizer, name):
    """transformers' multimodal message form (the Gemma 3 notebooks prompt with it) renders like plain strings;
    a part that is not text is an error, not its Python repr in the prompt."""
    from jinja2.exceptions import TemplateError

    from fasttune.data.templates import with_mapping

    jinja = with_mapping(resolve_chat_template(name), None)
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in CONVERSATION]
    assert render(bare_tokenizer, jinja, parts, gen=True) == render(bare_tokenizer, name, CONVERSATION, gen=True)
    image = [{"role": "user", "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(TemplateError, match="renders text only.*type image"):
        render(bare_tokenizer, jinja, image)


def test_bad_mapping_is_a_config_error():
    from fasttune.data.templates import with_mapping

    with pytest.raises(ConfigError, match="'role', 'content', 'user' and 'assistant'"):
        with_mapping(CHAT_TEMPLATES["chatml"], {"role": "from", "content": "value"})


@pytest.mark.parametrize("alias, name", [("llama3", "llama-3"), ("Llama-3.1", "llama-3.1"), ("llama-31", "llama-3.1"),
                                         ("gemma2", "gemma"), ("gemma-3", "gemma"), ("gemma3", "gemma"),
                                         ("qwen2.5", "qwen-2.5"), ("qwen3", "qwen-3"), ("phi-4", "phi-4"),
                                         ("PHI_3", "phi-3"), ("llama-3.2", "llama-3.1"), ("llama-33", "llama-3.1"),
                                         ("phi-3.5", "phi-3"), ("gemma-3n", "gemma"), ("qwen3-instruct", "qwen-3"),
                                         ("gemma4", "gemma-4"), ("gemma4_thinking", "gemma-4-thinking"),
                                         ("qwen3-thinking", "qwen-3-thinking"), ("lfm-2.5", "lfm-2"),
                                         ("qwen-25", "qwen-2.5")])
def test_aliases(alias, name):
    from fasttune.data.templates import template_name

    assert template_name(alias) == name


def test_gemma_4_trains_on_responses_and_its_thinking_prompt_is_named():
    """gemma-4's model turns are the targets under train_on_responses_only; gemma-4-thinking's generation prompt (an
    empty thought channel) is not where its training turns start, so that combination is named."""
    tok = make_tiny_tokenizer(chat_template=None)
    tok.add_tokens(["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<bos>"], special_tokens=True)
    tok.bos_token = "<bos>"
    rows = [{"messages": CONVERSATION[1:3]}]
    (ex,) = tokenize_rows(rows, tok, max_seq_length=512, chat_template="gemma-4", train_on_responses_only=True)
    target = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert target == "Paris.<turn|>\n"
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_rows(rows, tok, max_seq_length=512, chat_template="gemma-4-thinking", train_on_responses_only=True)
