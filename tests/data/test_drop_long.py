import logging
import warnings

import pytest

from fasttune.data import tokenize_rows
from fasttune.errors import DataError
from fasttune.train.config import SFTConfig

EOS = 256
ROWS = [{"text": "x" * 50}, {"text": "short"}, {"text": "y" * 20}]  # 51, 6 and 21 tokens with EOS


def test_truncation_is_the_default_and_logs_the_count(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="fasttune.data"), warnings.catch_warnings():
        warnings.simplefilter("error")  # truncation drops nothing: no warning
        examples = tokenize_rows(ROWS, tiny_tokenizer, max_seq_length=10)
    assert [len(e["input_ids"]) for e in examples] == [10, 6, 10]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "2 of 3 rows" in messages[0] and "truncated" in messages[0]


def test_drop_long_drops_and_counts_once(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="fasttune.data"), pytest.warns(UserWarning) as record:
        examples = tokenize_rows(ROWS, tiny_tokenizer, max_seq_length=10, drop_long=True)
    assert examples == [{"input_ids": list(b"short") + [EOS], "labels": list(b"short") + [EOS]}]
    dropped = [str(w.message) for w in record if "Dropped" in str(w.message)]
    assert len(dropped) == 1 and "Dropped 2 of 3 rows" in dropped[0] and "max_seq_length=10" in dropped[0]
    assert not any("truncated" in r.getMessage() for r in caplog.records)


def test_drop_long_keeps_rows_that_fit_exactly(tiny_tokenizer):
    (ex,) = tokenize_rows([{"text": "x" * 9}], tiny_tokenizer, max_seq_length=10, drop_long=True)
    assert len(ex["input_ids"]) == 10


def test_drop_long_with_nothing_left_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="its only row is longer than max_seq_length=10.*drop_long"):
        tokenize_rows(ROWS[:1], tiny_tokenizer, max_seq_length=10, drop_long=True)


def test_config_and_cli_flag():
    from fasttune.cli import build_parser

    assert SFTConfig().drop_long is False
    args = build_parser().parse_args(["train", "--drop-long"])
    assert args.drop_long is True
