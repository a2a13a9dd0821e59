"""Tokenizing through datasets.map: the fingerprint cache, worker processes, and their errors."""
import json
import warnings

import datasets
import pytest

from fasttune.data import tokenize_rows
from fasttune.data.encode import SFTEncoder
from fasttune.data.examples import TokenizedExamples
from fasttune.data.tokenize import resolve_num_proc
from fasttune.errors import ConfigError, DataError
from tiny_tokenizer import make_tiny_tokenizer

EOS = 256
CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in a fresh folder (builders read the setting when they are created)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts rows encoded in this process (the class is patched: instances pickle and hash the same)."""
    calls = []
    original = SFTEncoder.encode

    def counting(self, row, index):
        calls.append(index)
        return original(self, row, index)

    monkeypatch.setattr(SFTEncoder, "encode", counting)
    return calls


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cache_files(folder):
    return sorted(p.name for p in folder.rglob("cache-*.arrow"))


def test_second_run_reuses_the_cache(tmp_path, hf_cache, encode_calls, tiny_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 5)
    first = tokenize_rows(path, tiny_tokenizer, max_seq_length=64, train_on_responses_only=True)
    assert len(encode_calls) == 5 and len(cache_files(hf_cache)) == 1

    # A new tokenizer object with the same content: same fingerprint, nothing is tokenized again.
    again = tokenize_rows(path, make_tiny_tokenizer(), max_seq_length=64, train_on_responses_only=True)
    assert again == first and len(encode_calls) == 5 and len(cache_files(hf_cache)) == 1


@pytest.mark.parametrize("change", [
    {"max_seq_length": 40},
    {"train_on_responses_only": False},
    {"chat_template": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"},
    {"drop_long": True},
])
def test_changed_settings_tokenize_again(tmp_path, hf_cache, encode_calls, tiny_tokenizer, change):
    rows = [{"messages": CHAT}] * 2 + [{"messages": CHAT[:1] + [{"role": "assistant", "content": "x" * 60}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    settings = dict(max_seq_length=50, train_on_responses_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # drop_long's warning is tested elsewhere
        before = tokenize_rows(path, tiny_tokenizer, **settings)
        after = tokenize_rows(path, tiny_tokenizer, **{**settings, **change})
    assert len(encode_calls) == 6 and len(cache_files(hf_cache)) == 2
    assert after != before


def test_another_tokenizer_tokenizes_again(tmp_path, hf_cache, encode_calls, tiny_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    tokenize_rows(path, tiny_tokenizer, max_seq_length=64)
    other = make_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenize_rows(path, other, max_seq_length=64)
    assert len(encode_calls) == 6


def test_edited_file_tokenizes_again(tmp_path, hf_cache, encode_calls, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    assert tokenize_rows(path, tiny_tokenizer, max_seq_length=64)[1]["input_ids"] == list(b"two") + [EOS]
    write_jsonl(path, [{"text": "one"}, {"text": "three"}])
    assert tokenize_rows(path, tiny_tokenizer, max_seq_length=64)[1]["input_ids"] == list(b"three") + [EOS]
    assert len(encode_calls) == 4


def test_cached_run_keeps_counts_and_warnings(tmp_path, hf_cache, tiny_tokenizer, caplog):
    rows = [{"prompt": "p" * 30, "completion": "c"}, {"prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    for _ in range(2):  # the second run reads the cache, and says the same
        caplog.clear()
        with pytest.warns(UserWarning, match="Dropped 1 of 2 rows of pc.jsonl"):
            examples = tokenize_rows(path, tiny_tokenizer, max_seq_length=8, train_on_responses_only=True)
        assert examples == [{"input_ids": [ord("p"), ord("c"), EOS], "labels": [-100, ord("c"), EOS]}]
        assert any("1 of 2 rows of pc.jsonl" in r.getMessage() for r in caplog.records)


def test_save_to_disk_folder_is_cached_too(tmp_path, encode_calls, tiny_tokenizer):
    datasets.Dataset.from_list([{"text": "hello"}] * 4).save_to_disk(str(tmp_path / "ds"))
    for _ in range(2):
        tokenize_rows(tmp_path / "ds", tiny_tokenizer, max_seq_length=64)
    assert len(encode_calls) == 4


def test_lists_are_not_cached(encode_calls, tiny_tokenizer):
    rows = [{"text": "hello"}] * 3
    assert tokenize_rows(rows, tiny_tokenizer, max_seq_length=64) == tokenize_rows(rows, tiny_tokenizer,
                                                                                   max_seq_length=64)
    assert len(encode_calls) == 6


# -- worker processes ----------------------------------------------------------------------------------


def test_two_processes_give_the_same_examples(tmp_path, hf_cache, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 9)}]}
            for i in range(40)] + [{"messages": CHAT}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    settings = dict(max_seq_length=40, train_on_responses_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = tokenize_rows(rows, tiny_tokenizer, **settings)  # the in-process path
        two = tokenize_rows(path, tiny_tokenizer, num_proc=2, **settings)
        listed = tokenize_rows(rows, tiny_tokenizer, num_proc=2, **settings)  # a list through Arrow
    assert one == two == listed and len(one) == len(rows)
    assert isinstance(one, list) and isinstance(two, TokenizedExamples)  # Arrow-backed when from a dataset
    assert cache_files(hf_cache)


def test_bad_row_in_a_worker_names_file_row_and_field(tmp_path, hf_cache, tiny_tokenizer):
    rows = [{"text": f"row {i}"} for i in range(10)]
    rows[7] = {"text": "   "}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"^Row 7 of d\.jsonl: field 'text' is empty"):
        tokenize_rows(path, tiny_tokenizer, max_seq_length=64, num_proc=2)  # row 7 is in the second shard
    # The shard that failed leaves no half-written file (a finished shard stays, as datasets keeps it).
    assert not [p for p in hf_cache.rglob("*") if p.name.startswith("tmp")]
    assert not [name for name in cache_files(hf_cache) if "_00001_of_00002" in name]


def test_bad_message_in_a_worker(tmp_path, hf_cache, tiny_tokenizer):
    rows = [{"messages": CHAT}] * 6 + [{"messages": [{"role": "wizard", "content": "x"}] + CHAT[1:]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"Row 6 of chat\.jsonl, messages\[0\] has the unknown role 'wizard'"):
        tokenize_rows(path, tiny_tokenizer, max_seq_length=64, num_proc=2)


def test_resolve_num_proc(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert resolve_num_proc(None, 9_999) == 1
    assert resolve_num_proc(None, 10_000) == 8
    assert resolve_num_proc(3, 100) == 3 and resolve_num_proc(4, 2) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # min(8, CPU cores)
    assert resolve_num_proc(None, 9_999) == 1 and resolve_num_proc(None, 50_000) == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="dataset_num_proc"):
            resolve_num_proc(bad, 100)


def test_sft_trainer_reads_the_cache_on_a_second_run(tmp_path, hf_cache, tiny_model_dir, monkeypatch):
    """Through SFTTrainer, with the tokenizer from_pretrained gives (a transformers PreTrainedTokenizerFast): a
    second trainer on the same file, with a freshly loaded tokenizer of the same content, never calls the
    tokenizer, takes the examples from the cache file the first wrote, and trains on them."""
    from transformers import PreTrainedTokenizerFast

    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (1 + i)}]}
            for i in range(6)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    folder = tiny_model_dir("llama")
    calls = []
    for name in ("__call__", "apply_chat_template"):  # on the class: the cache key hashes the instance
        original = getattr(PreTrainedTokenizerFast, name)
        monkeypatch.setattr(PreTrainedTokenizerFast, name, lambda self, *a, _f=original, _n=name, **k:
                            calls.append(_n) or _f(self, *a, **k))

    def trainer(out):
        model, tok = FastLanguageModel.from_pretrained(str(folder))
        assert isinstance(tok, PreTrainedTokenizerFast)
        model = FastLanguageModel.get_peft_model(model, r=4)
        args = SFTConfig(output_dir=str(tmp_path / out), max_steps=1, per_device_train_batch_size=2,
                         max_seq_length=64, train_on_responses_only=True)
        return SFTTrainer(model=model, tokenizer=tok, train_dataset=str(path), args=args)

    first = trainer("a")
    assert "__call__" in calls and "apply_chat_template" in calls
    written = cache_files(hf_cache)
    assert len(written) == 1
    calls.clear()
    second = trainer("b")
    assert calls == [] and cache_files(hf_cache) == written
    assert isinstance(second.train_examples, TokenizedExamples) and len(second.train_examples) == len(rows)
    assert list(second.train_examples) == list(first.train_examples)
    assert second.train()["global_step"] == 1
