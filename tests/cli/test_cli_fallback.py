"""fasttune train on the transformers+PEFT path: another architecture trains with the warning; --no-fast on llama
gives the same per-step losses as the fast path."""
import json

import torch
from chat_rows import write_chat_rows

from fasttune.cli import main


_rows = write_chat_rows


def _gpt2(folder, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=300, bos_token_id=1,
                               eos_token_id=256, pad_token_id=256)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "log_history.jsonl").read_text().splitlines()]


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "3",
                 "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", *extra])


def test_gpt2_trains_through_the_fallback_with_a_warning(tmp_path, tiny_tokenizer, capsys):
    out = tmp_path / "out"
    rc = _train(_gpt2(tmp_path / "g", tiny_tokenizer), _rows(tmp_path / "d.jsonl"), out)
    captured = capsys.readouterr()
    assert rc == 0
    warning = [line for line in captured.err.splitlines() if line.startswith("fasttune: warning:")]
    assert len(warning) == 1 and "'gpt2'" in warning[0] and "standard speed" in warning[0]
    assert "Sample after training" in captured.out
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter" / "tokenizer.json").exists() and (out / "loss.png").exists()
    assert len(_losses(out)) == 3


def test_no_fast_equals_fast_losses(tiny_model_dir, tmp_path, capsys):
    model, data = tiny_model_dir("llama"), _rows(tmp_path / "d.jsonl")
    assert _train(model, data, tmp_path / "fast", "--no-sample") == 0
    assert _train(model, data, tmp_path / "slow", "--no-sample", "--no-fast") == 0
    assert "--no-fast was given" in capsys.readouterr().err
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "slow")), torch.tensor(_losses(tmp_path / "fast")),
                               rtol=1e-5, atol=0)


def test_generate_with_model_and_adapter_on_a_fallback_base(tmp_path, tiny_tokenizer, capsys):
    base = _gpt2(tmp_path / "g", tiny_tokenizer)
    assert _train(base, _rows(tmp_path / "d.jsonl"), tmp_path / "out", "--no-sample") == 0
    capsys.readouterr()
    args = ["generate", "--prompt", "q1", "--max-new-tokens", "4"]
    assert main(args + ["--adapter", str(tmp_path / "out" / "adapter")]) == 0
    alone = capsys.readouterr().out
    assert main(args + ["--model", str(base), "--adapter", str(tmp_path / "out" / "adapter")]) == 0
    assert capsys.readouterr().out == alone  # the same adapter on the same base gives the same greedy reply
