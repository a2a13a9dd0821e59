"""Every file the commands write fails as one paragraph (exit 2, no traceback, no temporary file or folder left)
when the system refuses the write: the adapter and its tokenizer, the training log, the run record, the loss plot
(train), the merged model and GGUF files (export). The failures are real ones: a file-size limit (RLIMIT_FSIZE:
writes past it fail with EFBIG, as a full disk fails with ENOSPC) or a folder where the file should go.
Checkpoints: tests/train/test_checkpoint.py."""
import re
import resource
import signal
from contextlib import contextmanager

import pytest
from bpe_tokenizers import make_bpe_tokenizer
from chat_rows import write_chat_rows
from tiny import hf_model, save_hf

from fasttune.cli import main


@contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG ('File too large') instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _data(tmp_path):
    return write_chat_rows(tmp_path / "d.jsonl")


def _train(model_dir, tmp_path, out, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(_data(tmp_path)), "--output-dir", str(out),
                 "--max-steps", "1", "--no-sample", *extra])


def _no_temporaries(folder):
    return not folder.exists() or not [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# (extra flags, file-size limit, the file that fails, what the message calls it). Sizes on the tiny llama:
# adapter_model.safetensors 11.6 kB at r=1 (~2 kB with q_proj only), tokenizer.json 5.7 kB, loss.png ~37 kB.
@pytest.mark.parametrize("extra, limit, failing, what", [
    (["--lora-r", "1"], 8_000, "adapter", "the adapter"),
    (["--lora-r", "1", "--target-modules", "q_proj"], 4_000, "adapter", "the adapter"),  # tokenizer.json fails
    (["--lora-r", "1"], 20_000, "loss.png", "the loss plot"),
], ids=["adapter", "tokenizer", "plot"])
def test_train_write_past_the_limit_is_one_paragraph(extra, limit, failing, what, tiny_model_dir, tmp_path, capsys):
    model, out = tiny_model_dir("llama"), tmp_path / "run"
    with file_size_limit(limit):
        code = _train(model, tmp_path, out, *extra)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = f"fasttune: error: Could not write {what} to '{out / failing}': File too large."
    assert _no_temporaries(out)
    if failing == "adapter":  # nothing complete: the run's folder is removed
        assert line in err.splitlines() and not out.exists()
    else:  # the adapter was saved before the plot failed: it is kept, and the message says so
        assert f"{line} The trained adapter itself is complete in '{out / 'adapter'}'." in err.splitlines()
        assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("name, what", [("log_history.jsonl", "the training log"),
                                        ("fasttune_run.json", "the run record"), ("loss.png", "the loss plot")])
def test_train_output_file_that_is_a_folder(name, what, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    assert _train(tiny_model_dir("llama"), tmp_path, out) == 2
    err = capsys.readouterr().err
    assert f"fasttune: error: Could not write {what} to '{out / name}': Is a directory." in err
    assert "Traceback" not in err
    # the log is written during training (nothing complete yet); the run record and plot after the adapter
    assert ("The trained adapter itself is complete" in err) == (name != "log_history.jsonl")


@pytest.fixture
def adapter(tmp_path):
    """A tiny llama adapter whose base has a BPE tokenizer (GGUF export needs merges)."""
    from fasttune import FastLanguageModel

    tok = make_bpe_tokenizer("gpt2")
    save_hf(hf_model("llama", vocab_size=len(tok)), tmp_path / "base", tok)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "base"))
    FastLanguageModel.get_peft_model(model, r=4).save_pretrained(tmp_path / "adapter", tok)
    return tmp_path / "adapter"


@pytest.mark.parametrize("fmt, output, what, cause", [
    ("merged", "merged", "the merged model", r"File too large\."),
    # gguf writes through numpy's tofile, whose short write carries no errno
    ("gguf", "m.gguf", "the GGUF file", r"only \d+ of \d+ bytes were written \(the disk is full or a file-size "
                                        r"limit was reached\)\. Free some space or choose another output location\."),
])
def test_export_write_past_the_limit_is_one_paragraph(fmt, output, what, cause, adapter, tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    quant = ["--quantization", "f16"] if fmt == "gguf" else []
    with file_size_limit(20_000):
        code = main(["export", "--adapter", str(adapter), "--format", fmt, *quant, "--output", str(out / output)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = rf"fasttune: error: Could not write {what} to '{re.escape(str(out / output))}': {cause}"
    assert any(re.fullmatch(line, x) for x in err.splitlines()), err
    assert list(out.iterdir()) == []  # nothing half-written, no temporary file


def test_export_removes_what_a_killed_gguf_export_left(adapter, tmp_path):
    leftover = tmp_path / ".m.gguf.tmp-4242"
    leftover.write_bytes(b"GGUF" + b"\0" * 100)  # a write cut short by a kill
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--quantization", "f16", "--output",
                 str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").exists() and not leftover.exists()
