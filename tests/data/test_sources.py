import json

import datasets
import pytest

from fasttune.data import load_rows
from fasttune.errors import DataError

ROWS = [{"text": "hello"}, {"text": "world"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dataset_and_list_and_dataframe():
    ds = datasets.Dataset.from_list(ROWS)
    assert load_rows(ds) is ds
    assert load_rows(ROWS)["text"] == ["hello", "world"]
    assert load_rows(ds.to_pandas())["text"] == ["hello", "world"]


def test_dataset_dict_uses_train_split():
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    assert len(load_rows(dd)) == 2


def test_dataset_dict_without_train_split():
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(DataError, match="no 'train' split.*'validation'"):
        load_rows(dd)


@pytest.mark.parametrize("rows, match", [([], "empty"), ([{"text": "a"}, "b"], "Row 1 .* str, not a dict")])
def test_bad_lists(rows, match):
    with pytest.raises(DataError, match=match):
        load_rows(rows)


def test_unsupported_object():
    with pytest.raises(DataError, match="got an object of type int"):
        load_rows(42)


def test_file_formats(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "d.csv").write_text("text\nhello\nworld\n", encoding="utf-8")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    for name in ["d.jsonl", "d.json", "d.csv", "d.parquet"]:
        assert load_rows(tmp_path / name)["text"] == ["hello", "world"], name
    assert load_rows(str(tmp_path / "d.jsonl"))["text"] == ["hello", "world"]


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows(tmp_path / "single")) == 2
    assert len(load_rows(tmp_path / "dict")) == 2


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found") as err:
        load_rows(path)
    assert str(path) in str(err.value) and ".parquet" in str(err.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"extension '\.txt' is not supported") as err:
        load_rows(path)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_rows(path)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON") as err:
        load_rows(path)
    assert str(path) in str(err.value)


def test_truncated_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"nope")
    with pytest.raises(DataError, match="Cannot read .*bad.parquet as PARQUET"):
        load_rows(path)


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset written by datasets' save_to_disk"):
        load_rows(tmp_path)


@pytest.mark.parametrize("name, content, line", [
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"), 2),
    ("latin1.json", '[{"text": "ok"},\n {"text": "café"}]'.encode("latin-1"), 2),
    ("latin1.csv", "text\nok\ncafé\n".encode("cp1252"), 3),
])
def test_text_file_not_utf8_names_file_line_and_fix(tmp_path, name, content, line):
    """Before: .jsonl loaded and failed at the first row access, .json/.csv with the decoder's words."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        load_rows(str(tmp_path / name))
    msg = str(e.value)
    assert f"'{tmp_path / name}' is not UTF-8 text: byte 0xe9 on line {line}" in msg
    assert "save it with that encoding" in msg and f"iconv -f <its encoding> -t utf-8 {name}" in msg


def test_utf16_file_is_named_as_utf16(tmp_path):
    (tmp_path / "wide.jsonl").write_bytes('{"text": "hi"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match=r"wide.jsonl' is not UTF-8 text: it is UTF-16 text\. .*save it"):
        load_rows(str(tmp_path / "wide.jsonl"))


def test_utf8_with_bom_and_multibyte_characters_load(tmp_path):
    (tmp_path / "ok.csv").write_bytes("text\ncafé ★ 日本語\n".encode("utf-8-sig"))
    assert load_rows(str(tmp_path / "ok.csv"))[0]["text"] == "café ★ 日本語"


def test_csv_cells_are_the_text_in_the_file_as_pythons_csv_reads_it(tmp_path, tiny_tokenizer):
    """Outputs that look like numbers or NA stay text (they used to become [4.0, 2.5, None, None, 2139.0])."""
    import csv

    from fasttune.data import tokenize_rows

    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\nAdd 2 and 2,,4\nPrice?,a pen,2.50\nAge?,,NA\nValue?,"",None\n'
                    'ZIP of Cambridge MA?,,02139\n', encoding="utf-8")
    with path.open(newline="", encoding="utf-8") as f:
        oracle = list(csv.DictReader(f))
    rows = load_rows(str(path))
    assert rows.to_list() == oracle
    assert rows["output"] == ["4", "2.50", "NA", "None", "02139"]
    examples = tokenize_rows(str(path), tiny_tokenizer, max_seq_length=256)
    assert len(examples) == 5
    last = tiny_tokenizer.decode(examples[4]["input_ids"])
    assert "02139" in last and "2139.0" not in last


def test_csv_keeps_kto_labels_and_reference_logps_typed(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label,ref_chosen_logps\nHi,Hello,true,-1.5\nHi,Go away,False,-2\n",
                    encoding="utf-8")
    rows = load_rows(str(path))
    assert rows["label"] == [True, False] and rows["ref_chosen_logps"] == [-1.5, -2.0]
    assert rows["completion"] == ["Hello", "Go away"]
    path.write_text("text,label\nfine,positive\nbad,negative\n", encoding="utf-8")
    assert load_rows(str(path))["label"] == ["positive", "negative"]  # not booleans: stays text
