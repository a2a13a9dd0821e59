"""Damaged or oddly typed files through the CLI (#17): data that is not UTF-8, YAML / JSON that does not parse,
truncated weights and adapters; YAML values that YAML types differently from the flags; typos of the short aliases.
Each bad one exits 2 with one paragraph naming the file (or key) and the fix, no traceback."""
import json

import pytest
import yaml

from fasttune.cli import main

LATIN1_ROW = '{"text": "café"}\n'.encode("latin-1")
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def _write(t, name, data):
    (t / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return t / name


def _cut(path, drop=10):
    path.write_bytes(path.read_bytes()[:-drop])
    return path


# name: (extra `train` args from (tmp_path, tiny model folder), the message's parts)
TRAIN_CASES = {
    "data jsonl not UTF-8": (lambda t, m: ["--data", str(_write(t, "l1.jsonl", LATIN1_ROW))],
                             ["l1.jsonl' is not UTF-8 text: byte 0xe9 on line 1", "save it with that encoding"]),
    "data csv not UTF-8": (lambda t, m: ["--data", str(_write(t, "w.csv", "text\nna\xefve\n".encode("cp1252")))],
                           ["w.csv' is not UTF-8 text: byte 0xef on line 2", "iconv"]),
    "yaml not UTF-8": (lambda t, m: ["--config", str(_write(t, "c.yaml", "lr: 1e-3\n# caf\xe9\n".encode("latin-1")))],
                       ["c.yaml' is not UTF-8 text: byte 0xe9 on line 2"]),
    "yaml syntax": (lambda t, m: ["--config", str(_write(t, "s.yaml", "lr: 1e-3\nepochs: [1,\n"))],
                    ["Config file '", "s.yaml' is not valid YAML", "line 3", "one `setting: value` per line"]),
    "model config.json not JSON": (lambda t, m: ["--model", str(_bad_config(m))],
                                   ["config.json' is not valid JSON: ", " at line ", "Download or copy it "
                                    "again"]),
    "model weights truncated": (lambda t, m: ["--model", str(_cut(m / "model.safetensors").parent)],
                                ["model.safetensors' as safetensors: the file is truncated, corrupt",
                                 "Download or copy it again"]),
    "data json not UTF-8": (lambda t, m: ["--data", str(_write(t, "l1.json", b'[' + LATIN1_ROW + b']'))],
                            ["l1.json' is not UTF-8 text: byte 0xe9 on line 1", "save it with that encoding"]),
    "model pytorch_model.bin truncated": (lambda t, m: ["--model", str(_bin_cut(m))],
                                          ["pytorch_model.bin", "zip archive torch.save writes has no end"]),
    "model gguf truncated": (lambda t, m: ["--model", str(_cut(_gguf(t), 4000))],
                             ["m.gguf' as GGUF: the file is truncated, corrupt", "Download or copy it again"]),
    "yaml wrong type for a run option": (lambda t, m: ["--config", str(_write(t, "d.yaml", "lora_dropout: high\n"))],
                                         ["lora_dropout='high' is invalid: it must be a number"]),
    "yaml list of non-names": (lambda t, m: ["--config", str(_write(t, "tm.yaml", "target_modules: [1, 2]\n"))],
                               ["target_modules=[1, 2] is invalid: give layer names"]),
    "yaml mapping for text option": (lambda t, m: ["--config", str(_write(t, "mp.yaml", "modules_to_save: {a: 1}\n"))],
                                     ["modules_to_save={'a': 1} is invalid: it must be a text value"]),
    "yaml alias typo grad_acum": (lambda t, m: ["--config", str(_write(t, "a.yaml", "grad_acum: 2\n"))],
                                  ["unknown setting 'grad_acum'. Did you mean 'grad_accum' (short for "
                                   "gradient_accumulation_steps)?"]),
    "yaml alias typo batchsize": (lambda t, m: ["--config", str(_write(t, "b.yaml", "batchsize: 2\n"))],
                                  ["Did you mean 'batch_size' (short for per_device_train_batch_size)?"]),
    "yaml alias typo epoch": (lambda t, m: ["--config", str(_write(t, "e.yaml", "epoch: 2\n"))],
                              ["Did you mean 'epochs' (short for num_train_epochs)?"]),
}


def _bin_cut(m):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return _cut(m / "pytorch_model.bin", 100).parent


def _gguf(t):
    from bpe_tokenizers import make_bpe_tokenizer
    from tiny import hf_model, save_hf

    from fasttune import FastLanguageModel

    save_hf(hf_model("llama", vocab_size=416), t / "g", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(t / "g"))
    return model.save_pretrained_gguf(t / "m.gguf", tok, quantization_method="f16", progress=False)


def _bad_config(m):
    (m / "config.json").write_text((m / "config.json").read_text()[:-30])
    return m


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_file_or_value(case, tiny_model_dir, tmp_path, capsys):
    make_args, parts = TRAIN_CASES[case]
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    data = _write(tmp_path, "good.jsonl", json.dumps(GOOD_ROW) + "\n")
    rc = main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
               "--no-sample", "--lora-r", "4"] + make_args(tmp_path, model))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("fasttune: error: ")]  # one paragraph
    for part in parts:
        assert part in line, err
    assert not out.exists()


def _adapter(tiny_model_dir, tmp_path):
    from fasttune import FastLanguageModel

    base = tiny_model_dir("llama")
    model, tok = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4).save_pretrained(tmp_path / "adapter", tok)
    return base, tmp_path / "adapter"


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi", "--max-new-tokens", "2"],
                                     ["export", "--format", "merged", "--output", "merged"], ["chat"]])
def test_damaged_adapter_in_generate_and_export(command, tiny_model_dir, tmp_path, capsys):
    base, adapter = _adapter(tiny_model_dir, tmp_path)
    _cut(adapter / "adapter_model.safetensors")
    for args in (["--adapter", str(adapter)], ["--model", str(base), "--adapter", str(adapter)]):
        assert main(command + args) == 2
        err = capsys.readouterr().err
        assert "adapter_model.safetensors' as safetensors: the file is truncated" in err, err
        assert "Save the adapter again" in err and "Traceback" not in err
    (adapter / "adapter_config.json").write_text("{'r': 4}")
    assert main(command + ["--adapter", str(adapter)]) == 2
    assert "adapter_config.json' is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_yaml_scalars_and_lists_become_the_flags_values(tiny_model_dir, tmp_path, capsys):
    """YAML 1.1 reads 5e-2 as text and [q_proj, v_proj] as a list; the flags take a number and comma-separated
    text. Before, both ended in a traceback inside get_peft_model."""
    cfg = _write(tmp_path, "run.yaml", "lora_dropout: 5e-2\ntarget_modules: [q_proj, v_proj]\nmodules_to_save: "
                                       "[embed_tokens]\nlora_r: '4'\ngradient_checkpointing: false\nresume: false\n"
                                       "packing: 'false'\nmax_steps: 1e0\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["lora_dropout"] == 0.05 and shown["lora_r"] == 4 and shown["max_steps"] == 1
    assert shown["target_modules"] == "q_proj,v_proj" and shown["modules_to_save"] == "embed_tokens"
    assert shown["gradient_checkpointing"] == "false" and shown["resume"] is None and shown["packing"] is False
    out = tmp_path / "out"
    data = _write(tmp_path, "good.jsonl", json.dumps(GOOD_ROW) + "\n")
    rc = main(["train", "--config", str(cfg), "--model", str(tiny_model_dir("llama")), "--data", str(data),
               "--output-dir", str(out), "--no-sample"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.05 and saved["target_modules"] == ["q_proj", "v_proj"]
    assert saved["modules_to_save"] == ["embed_tokens"]


@pytest.mark.parametrize("flag, hint", [
    ("--grad-acum", "Did you mean '--grad-accum' (short for --gradient-accumulation-steps)?"),
    ("--batchsize", "Did you mean '--batch-size' (short for --per-device-train-batch-size)?"),
    ("--lerning-rate", "Did you mean '--learning-rate'?"),
])
def test_mistyped_flag_suggests_the_flag_or_alias(flag, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", flag, "2", "--print-config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"unrecognized arguments: {flag} 2. {hint}" in err, err


def test_mistyped_flag_of_another_command_suggests_from_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--seeed", "1", "--epoch", "1"])
    err = capsys.readouterr().err
    assert "--seeed: Did you mean '--seed'?" in err and "epochs" not in err, err
