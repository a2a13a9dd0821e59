"""Fuzz the data path: arbitrary JSON rows either tokenize or raise a FastTuneError — never anything else."""
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasttune.data import tokenize_rows
from fasttune.errors import FastTuneError

json_scalars = st.none() | st.booleans() | st.integers(-5, 400) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), inner,
                                           max_size=3), max_leaves=12)
columns = st.sampled_from(["text", "messages", "conversations", "instruction", "input", "output", "prompt",
                           "completion", "input_ids", "labels", "chosen", "other"])
rows = st.lists(st.dictionaries(columns, json_values, max_size=4), min_size=0, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows, fmt=st.sampled_from(["auto", "text", "messages", "sharegpt", "alpaca", "prompt-completion",
                                       "tokenized"]), responses_only=st.booleans())
def test_arbitrary_rows_only_raise_fasttune_errors(rows, fmt, responses_only, tiny_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = tokenize_rows(rows, tiny_tokenizer, max_seq_length=32, data_format=fmt,
                                train_on_responses_only=responses_only)
        except FastTuneError:
            return
    for ex in out:
        assert len(ex["input_ids"]) == len(ex["labels"]) <= 32
        assert all(isinstance(i, int) for i in ex["input_ids"])
