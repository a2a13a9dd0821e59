"""fasttune export: adapter -> GGUF (loads in llama.cpp with our logits) and -> merged checkpoint (transformers),
GGUF -> merged; bad options are one-line errors with exit code 2 and nothing written."""
import numpy as np
import pytest
import torch
from bpe_tokenizers import make_bpe_tokenizer
from peft_oracle import randomize_lora_b
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.cli import main

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def adapter_dir(tmp_path):
    """A tiny llama base with a real BPE tokenizer (llama.cpp needs merges) and a LoRA adapter with weights."""
    tok = make_bpe_tokenizer("gpt2")
    save_hf(hf_model("llama", vocab_size=len(tok)), tmp_path / "base", tok)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "base"))
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter", tok)
    return tmp_path / "adapter"


def _our_logits(folder, ids):
    model, _ = FastLanguageModel.from_pretrained(str(folder))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_export_adapter_to_gguf_runs_in_llama_cpp(adapter_dir, tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--quantization", "f16",
                 "--output", str(out)]) == 0
    path = out / "model.F16.gguf"
    assert str(path) in capsys.readouterr().out and (out / "Modelfile").exists()
    tok = make_bpe_tokenizer("gpt2")
    ids = tok(TEXT)["input_ids"]
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    llm.close()
    ours = _our_logits(adapter_dir, ids)
    assert np.abs(theirs - ours).max() / (ours.max() - ours.min()) < 2e-3


def test_export_comma_list_of_quantizations(adapter_dir, tmp_path, capsys):
    """--quantization q8_0,F16: one file per method in the output folder, each loads in llama.cpp; one Modelfile."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--quantization", "q8_0,F16",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    paths = [out / "model.Q8_0.gguf", out / "model.F16.gguf"]
    assert all(str(p) in printed for p in paths) and "FROM model.Q8_0.gguf" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.F16.gguf", "model.Q8_0.gguf"]
    ids = make_bpe_tokenizer("gpt2")(TEXT)["input_ids"]
    ours = _our_logits(adapter_dir, ids)
    for path, limit in zip(paths, (5e-2, 2e-3)):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)])
        llm.close()
        assert np.abs(theirs - ours).max() / (ours.max() - ours.min()) < limit, path


def test_export_merged_and_back_from_gguf(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = make_bpe_tokenizer("gpt2")(TEXT)["input_ids"]
    ours = _our_logits(adapter_dir, ids)
    assert main(["export", "--adapter", str(adapter_dir), "--format", "merged", "--output",
                 str(tmp_path / "merged")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor([ids])).logits[0].numpy(), ours, atol=1e-5)
    # a GGUF file as --model, back to a transformers checkpoint
    assert main(["export", "--model", str(tmp_path / "merged"), "--format", "gguf", "--quantization", "f32",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    assert main(["export", "--model", str(tmp_path / "m.gguf"), "--format", "merged", "--output",
                 str(tmp_path / "again")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor([ids])).logits[0].numpy(), ours, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (["--format", "gguf", "--quantization", "iq2_xs"], "iq2_xs"),
    (["--format", "gguf", "--quantization", "q8_0,iq2_xs"], "'iq2_xs' is not supported"),
    (["--format", "merged", "--quantization", "q8_0"], "does not apply to --format merged"),
    (["--format", "gguf", "--adapter", "nowhere"], "adapter_config.json"),
])
def test_export_user_errors(args, match, adapter_dir, tmp_path, capsys):
    if "--adapter" not in args:
        args = args + ["--adapter", str(adapter_dir)]
    rc = main(["export", "--output", str(tmp_path / "out")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_gguf_refusal_names_the_command_line_way_out(tiny_model_dir, tmp_path, capsys):
    """A model llama.cpp would compute otherwise (Falcon-H1 norming before the gate, its tiny default): the refusal
    names --format merged beside the API's save_pretrained_merged, and nothing is written."""
    rc = main(["export", "--model", str(tiny_model_dir("falcon_h1")), "--format", "gguf", "--quantization", "f16",
               "--output", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "with --format merged (save_pretrained_merged) instead" in err and "Traceback" not in err
    assert not (tmp_path / "m.gguf").exists()
