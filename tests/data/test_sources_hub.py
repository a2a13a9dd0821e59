"""Hub dataset ids: only a string shaped like "org/name" that names no local path goes to the hub; without the
hub the error says so and how to get the data. (No network here: only the offline paths are tested.)"""
import datasets
import pytest

from fasttune.data import load_rows
from fasttune.data.sources import looks_like_hub_id
from fasttune.errors import DataError

ROWS = [{"text": "hello"}, {"text": "world"}]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.mark.parametrize("source, hub", [
    ("HuggingFaceH4/no_robots", True),
    ("org/name.v2", True),
    ("org/data.jsonl", False),  # a data file's name: a missing local file
    ("./org/name", False),
    ("/org/name", False),
    ("a/b/c", False),
    ("name", False),
    ("org/", False),
])
def test_hub_id_shape(tmp_path, monkeypatch, source, hub):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id(source) is hub


def test_a_local_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    datasets.Dataset.from_list(ROWS).save_to_disk("org/name")
    assert not looks_like_hub_id("org/name")
    assert load_rows("org/name")["text"] == ["hello", "world"]
    (tmp_path / "org" / "other").mkdir()  # an existing folder that is not a dataset: a local error, no hub
    with pytest.raises(DataError, match="not a dataset written by datasets' save_to_disk"):
        load_rows("org/other")
    with pytest.raises(DataError, match="Dataset file not found"):
        load_rows("org/data.jsonl")


def test_offline_env_gives_a_clear_error(tmp_path, monkeypatch, empty_hf_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_rows("someorg/somedata")
    msg = str(err.value)
    assert "'someorg/somedata' is not a local file or folder" in msg and "hub cannot be reached" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "load_dataset('someorg/somedata', split='train').save_to_disk('somedata')" in msg


def test_offline_mode_with_nothing_cached(tmp_path, monkeypatch, empty_hf_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as if HF_HUB_OFFLINE=1 before the import
    with pytest.raises(DataError, match=r"hub cannot be reached \(offline mode is on\); datasets' cache does not"):
        load_rows("someorg/somedata")


def test_cli_data_hub_id_offline(tmp_path, monkeypatch, empty_hf_cache, tiny_model_dir, capsys):
    from fasttune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = main(["train", "--model", str(tiny_model_dir("llama")), "--data", "someorg/somedata",
               "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--no-sample"])
    err = capsys.readouterr().err
    assert rc != 0 and "someorg/somedata" in err and "hub cannot be reached" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
