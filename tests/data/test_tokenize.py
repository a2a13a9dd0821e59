import json
import re
import warnings

import datasets
import pytest

from fasttune.data import demo_dataset_path, load_rows, tokenize_rows
from fasttune.errors import DataError
from tiny_tokenizer import make_tiny_tokenizer

EOS, IM_START, IM_END = 256, 257, 258


def byte_ids(text):
    return list(text.encode("utf-8"))


def target_runs(example, tokenizer):
    """Decoded text of each contiguous run of target tokens."""
    runs, current = [], []
    for tok, lab in zip(example["input_ids"], example["labels"]):
        if lab != -100:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris — café city."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo."},
]


# -- layouts -------------------------------------------------------------------------------------------


def test_text_appends_eos_once(tiny_tokenizer):
    (ex,) = tokenize_rows([{"text": "hi there"}], tiny_tokenizer, max_seq_length=64)
    assert ex["input_ids"] == byte_ids("hi there") + [EOS]
    assert ex["labels"] == ex["input_ids"]
    (ex,) = tokenize_rows([{"text": "hi<|endoftext|>"}], tiny_tokenizer, max_seq_length=64)
    assert ex["input_ids"] == byte_ids("hi") + [EOS]


def test_text_custom_field(tiny_tokenizer):
    (ex,) = tokenize_rows([{"body": "abc"}], tiny_tokenizer, max_seq_length=64, dataset_text_field="body")
    assert ex["input_ids"] == byte_ids("abc") + [EOS]


def test_messages_all_tokens(tiny_tokenizer):
    (ex,) = tokenize_rows([{"messages": CONVERSATION}], tiny_tokenizer, max_seq_length=512)
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex["input_ids"] == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][0] == IM_START and ex["input_ids"][-2:] == [IM_END, ord("\n")]


def test_messages_every_assistant_turn_is_a_target(tiny_tokenizer):
    (ex,) = tokenize_rows(
        [{"messages": CONVERSATION}], tiny_tokenizer, max_seq_length=512, train_on_responses_only=True
    )
    assert target_runs(ex, tiny_tokenizer) == ["Paris — café city.<|im_end|>\n", "Tokyo.<|im_end|>\n"]
    assert len(ex["labels"]) == len(ex["input_ids"])


class SlowTokenizer:
    """The tiny tokenizer without offset mappings, as a slow (Python) tokenizer would be."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError
        return self._inner(text, **kwargs)


def test_masking_without_offsets_matches(tiny_tokenizer):
    rows = [{"messages": CONVERSATION}]
    fast = tokenize_rows(rows, tiny_tokenizer, max_seq_length=512, train_on_responses_only=True)
    slow = tokenize_rows(rows, SlowTokenizer(tiny_tokenizer), max_seq_length=512, train_on_responses_only=True)
    assert fast == slow


def test_sharegpt_matches_messages(tiny_tokenizer):
    conv = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in CONVERSATION]
    for responses_only in (False, True):
        a = tokenize_rows([{"conversations": conv}], tiny_tokenizer, max_seq_length=512,
                          train_on_responses_only=responses_only)
        b = tokenize_rows([{"messages": CONVERSATION}], tiny_tokenizer, max_seq_length=512,
                          train_on_responses_only=responses_only)
        assert a == b


def test_alpaca_with_chat_template(tiny_tokenizer):
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    (ex,) = tokenize_rows([row], tiny_tokenizer, max_seq_length=512, train_on_responses_only=True)
    assert target_runs(ex, tiny_tokenizer) == ["5<|im_end|>\n"]
    assert "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>" in tiny_tokenizer.decode(ex["input_ids"])


def test_alpaca_without_chat_template():
    tok = make_tiny_tokenizer(chat_template=None)
    row = {"instruction": "Add.", "input": "", "output": "5"}
    (ex,) = tokenize_rows([row], tok, max_seq_length=512, train_on_responses_only=True)
    text = tok.decode(ex["input_ids"], skip_special_tokens=False)
    assert "### Instruction:\nAdd.\n\n### Response:\n5<|endoftext|>" in text
    assert target_runs(ex, tok) == ["5<|endoftext|>"]
    (ex,) = tokenize_rows([row], tok, max_seq_length=512)
    assert ex["labels"] == ex["input_ids"]


def test_prompt_completion(tiny_tokenizer):
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    (ex,) = tokenize_rows(rows, tiny_tokenizer, max_seq_length=64, train_on_responses_only=True)
    assert ex["input_ids"] == byte_ids("Q: 2+2?\nA:") + byte_ids(" 4") + [EOS]
    assert ex["labels"] == [-100] * len(byte_ids("Q: 2+2?\nA:")) + byte_ids(" 4") + [EOS]
    # TRL's completion_only_loss: None (default) trains on the completion only, as True does; False on everything
    assert tokenize_rows(rows, tiny_tokenizer, max_seq_length=64)[0]["labels"] == ex["labels"]
    (ex,) = tokenize_rows(rows, tiny_tokenizer, max_seq_length=64, completion_only_loss=False)
    assert ex["labels"] == ex["input_ids"]


def test_tokenized_rows_are_used_exactly(tiny_tokenizer):
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": None},
    ]
    assert tokenize_rows(rows, tiny_tokenizer, max_seq_length=8) == [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
    ]
    ds = datasets.Dataset.from_list([{"input_ids": [7, 8, 9], "text": "ignored"}])
    assert tokenize_rows(ds, tiny_tokenizer, max_seq_length=8) == [{"input_ids": [7, 8, 9], "labels": [7, 8, 9]}]


def test_format_override(tiny_tokenizer):
    rows = [{"messages": CONVERSATION, "text": "plain"}]
    (ex,) = tokenize_rows(rows, tiny_tokenizer, max_seq_length=64, data_format="text")
    assert ex["input_ids"] == byte_ids("plain") + [EOS]


def test_dataset_and_path_inputs(tiny_tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    from_path = tokenize_rows(path, tiny_tokenizer, max_seq_length=512, train_on_responses_only=True)
    from_ds = tokenize_rows(load_rows(path), tiny_tokenizer, max_seq_length=512, train_on_responses_only=True)
    assert from_path == from_ds
    assert target_runs(from_path[0], tiny_tokenizer)[1] == "Tokyo.<|im_end|>\n"


def test_heterogeneous_message_keys_from_arrow(tiny_tokenizer):
    # Arrow fills keys missing in some messages with None; templates must not see them.
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if 'name' in m %}{{ m['name'] + ': ' }}"
        "{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = make_tiny_tokenizer(chat_template=template)
    ds = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ])
    examples = tokenize_rows(ds, tok, max_seq_length=64)
    assert tok.decode(examples[1]["input_ids"]) == "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\nd<|im_end|>\n"


# -- truncation and dropping --------------------------------------------------------------------------


def test_truncation(tiny_tokenizer):
    (ex,) = tokenize_rows([{"text": "x" * 50}], tiny_tokenizer, max_seq_length=10)
    assert ex["input_ids"] == byte_ids("x" * 10) and ex["labels"] == ex["input_ids"]


def test_rows_without_targets_are_dropped_with_one_warning(tiny_tokenizer):
    rows = [
        {"prompt": "p" * 30, "completion": "c"},
        {"prompt": "q" * 30, "completion": "c"},
        {"prompt": "p", "completion": "c"},
    ]
    with pytest.warns(UserWarning, match="Dropped 2 of 3 rows") as record:
        examples = tokenize_rows(rows, tiny_tokenizer, max_seq_length=8, train_on_responses_only=True)
    assert len([w for w in record if "Dropped" in str(w.message)]) == 1
    assert examples == [{"input_ids": [ord("p"), ord("c"), EOS], "labels": [-100, ord("c"), EOS]}]


def test_all_rows_dropped(tiny_tokenizer):
    rows = [{"messages": CONVERSATION}]
    with pytest.raises(DataError, match="No usable training example"):
        tokenize_rows(rows, tiny_tokenizer, max_seq_length=8, train_on_responses_only=True)


@pytest.mark.parametrize("layout", ["messages", "prompt-completion", "alpaca", "sharegpt"])
def test_window_before_every_response_is_refused(tiny_tokenizer, layout):
    # Training on all tokens, max_seq_length=5 keeps targets (prompt tokens) but no response: a DataError, not a
    # run that only learns the prompts.
    row = {"messages": {"messages": [{"role": "user", "content": "What is the capital of Chile?"},
                                     {"role": "assistant", "content": "Santiago"}]},
           "prompt-completion": {"prompt": "What is the capital of Chile?", "completion": "Santiago"},
           "alpaca": {"instruction": "What is the capital of Chile?", "output": "Santiago"},
           "sharegpt": {"conversations": [{"from": "human", "value": "What is the capital of Chile?"},
                                          {"from": "gpt", "value": "Santiago"}]}}[layout]
    # (prompt/completion rows train on their prompts too only with completion_only_loss=False)
    with pytest.raises(DataError, match=r"max_seq_length=5 cuts off every response in the dataset: all 2 rows left are truncated"):
        tokenize_rows([row, row], tiny_tokenizer, max_seq_length=5, completion_only_loss=False)
    short = {"prompt": "Q?", "completion": "Santiago"}
    with pytest.warns(UserWarning, match=r"1 of 2 rows of the dataset are truncated to max_seq_length=5 before"):
        examples = tokenize_rows([row if layout == "prompt-completion" else
                                  {"prompt": "What is the capital of Chile?", "completion": "Santiago"}, short],
                                 tiny_tokenizer, max_seq_length=5, completion_only_loss=False)
    assert len(examples) == 2
    assert tokenize_rows([{"text": "x" * 50}], tiny_tokenizer, max_seq_length=5)  # text rows: every token counts


def test_single_token_row_has_no_target_after_shift(tiny_tokenizer):
    with pytest.raises(DataError, match="No usable training example"):
        tokenize_rows([{"input_ids": [5]}], tiny_tokenizer, max_seq_length=8)


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, match",
    [
        ({"text": 5}, "Row 1 of the dataset: field 'text' must be a string, but it is a int"),
        ({"text": None}, "Row 1 of the dataset: field 'text' is missing or null"),
        ({"text": "  "}, "Row 1 of the dataset: field 'text' is empty"),
    ],
)
def test_bad_text(tiny_tokenizer, row, match):
    with pytest.raises(DataError, match=match):
        tokenize_rows([{"text": "fine"}, row], tiny_tokenizer, max_seq_length=64)


def test_bad_messages_name_the_file_and_row(tiny_tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": CONVERSATION[1:3]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match="Row 1 of chat.jsonl: field 'messages' is empty"):
        tokenize_rows(path, tiny_tokenizer, max_seq_length=64)
    bad_role = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"Row 0 of the dataset, messages\[0\] has the unknown role 'wizard'"):
        tokenize_rows([bad_role], tiny_tokenizer, max_seq_length=64)


def test_bad_prompt_completion_and_alpaca(tiny_tokenizer):
    with pytest.raises(DataError, match="field 'completion' must be a string"):
        tokenize_rows([{"prompt": "a", "completion": 3}], tiny_tokenizer, max_seq_length=64)
    with pytest.raises(DataError, match=r"prompt \+ completion\[0\] is a str, not a dict"):
        tokenize_rows([{"prompt": ["a"], "completion": ["b"]}], tiny_tokenizer, max_seq_length=64)
    with pytest.raises(DataError, match="field 'instruction' is missing"):
        tokenize_rows([{"instruction": None, "output": "b"}], tiny_tokenizer, max_seq_length=64)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"input_ids": []}, "'input_ids' is empty"),
        ({"input_ids": [1, "2"]}, "must hold only integers"),
        ({"input_ids": "123"}, "must be a list of integers"),
        ({"input_ids": [1, 999]}, "token id 999, outside the tokenizer's vocabulary"),
        ({"input_ids": [1, 2], "labels": [1]}, "'labels' has 1 entries but 'input_ids' has 2"),
    ],
)
def test_bad_tokenized_rows(tiny_tokenizer, row, match):
    with pytest.raises(DataError, match=match):
        tokenize_rows([row], tiny_tokenizer, max_seq_length=64)


def test_messages_need_a_chat_template():
    tok = make_tiny_tokenizer(chat_template=None)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_rows([{"messages": CONVERSATION}], tok, max_seq_length=64)


def test_no_usable_column(tiny_tokenizer):
    with pytest.raises(DataError, match="columns found: 'question', 'answer'"):
        tokenize_rows([{"question": "q", "answer": "a"}], tiny_tokenizer, max_seq_length=64)


def test_template_that_is_not_prefix_stable():
    # Writes the turn count first, so a shorter conversation renders differently from the start.
    tok = make_tiny_tokenizer(chat_template="{{ messages|length }}\n" + make_tiny_tokenizer().chat_template)
    rows = [{"messages": CONVERSATION}]
    assert tokenize_rows(rows, tok, max_seq_length=512)  # fine without masking
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_rows(rows, tok, max_seq_length=512, train_on_responses_only=True)


def test_template_errors_become_data_errors():
    tok = make_tiny_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="Row 0 of the dataset: the tokenizer's chat template could not render"):
        tokenize_rows([{"messages": CONVERSATION}], tok, max_seq_length=64)


# -- scale and the demo dataset ------------------------------------------------------------------------


def test_many_rows_with_progress_bar(tiny_tokenizer):
    rows = [{"text": f"row {i}"} for i in range(1200)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = tokenize_rows(rows, tiny_tokenizer, max_seq_length=64)
    assert len(examples) == 1200 and examples[-1]["input_ids"] == byte_ids("row 1199") + [EOS]


def test_demo_dataset(tiny_tokenizer):
    path = demo_dataset_path()
    assert path.is_file()
    rows = load_rows(path)
    assert 100 <= len(rows) <= 150 and rows.column_names == ["messages"]
    for messages in rows["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert re.fullmatch(r"Answer: .+\. — fasttune", messages[1]["content"])
    examples = tokenize_rows(path, tiny_tokenizer, max_seq_length=512, train_on_responses_only=True)
    assert len(examples) == len(rows)
    assert all(len(ex["input_ids"]) < 250 for ex in examples)  # bytes: short rows keep CPU training fast


def test_conversational_prompt_completion(tiny_tokenizer):
    """prompt / completion as chat messages: rendered with the chat template, the loss on the completion's part
    (TRL's layout; tested token for token against trl.SFTTrainer in tests/compat); a mixed row is a DataError."""
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    (ex,) = tokenize_rows([row], tiny_tokenizer, max_seq_length=64)
    trained = [t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100]
    assert tiny_tokenizer.decode(trained) == "yo<|im_end|>\n" and len(trained) < len(ex["input_ids"])
    (ex,) = tokenize_rows([row], tiny_tokenizer, max_seq_length=64, completion_only_loss=False)
    assert ex["labels"] == ex["input_ids"]
    with pytest.raises(DataError, match="one of 'prompt' and 'completion' is a list"):
        tokenize_rows([{"prompt": "hi", "completion": row["completion"]}], tiny_tokenizer, max_seq_length=64)
