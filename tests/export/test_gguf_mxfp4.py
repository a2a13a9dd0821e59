"""GGUF export of gpt-oss with MXFP4 experts (quantization_method="mxfp4_moe", llama-quantize's MXFP4_MOE) against
llama.cpp: every tensor's type and bytes equal llama_model_quantize of our bf16 file, llama.cpp runs the file close to
our logits, an unchanged MXFP4 checkpoint keeps its own blocks (as convert_hf_to_gguf.py repacks them), the CLI, and
the refusal on dense models. One tiny gpt-oss (hidden 64, 4 experts top-2, sliding + full layer) stored as an MXFP4
checkpoint serves the module."""
import json

import numpy as np
import pytest
import torch
from bpe_tokenizers import make_bpe_tokenizer
from llama_cpp_check import compare_logits, llama_quantize
from peft_oracle import randomize_lora_b
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.export.mxfp4 import dequantize_mxfp4

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
           "Paris is the capital of France. Berlin is"]
EXPERTS = [f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down")]


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer("gpt2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bpe):
    """(folder, {name: (blocks, scales)}): the tiny gpt-oss with its experts packed to MXFP4 as OpenAI's checkpoints
    store them (quantization_config mxfp4)."""
    from safetensors.torch import load_file, save_file

    from fasttune.quant.mxfp4 import quantize_mxfp4

    plain = save_hf(hf_model("gpt_oss", vocab_size=416), tmp_path_factory.mktemp("plain"), bpe)
    folder = tmp_path_factory.mktemp("mxfp4")
    packed, pairs = {}, {}
    for name, t in load_file(plain / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            pairs[name] = quantize_mxfp4(t)
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = pairs[name]
        else:
            packed[name] = t
    save_file(packed, folder / "model.safetensors", metadata={"format": "pt"})
    for f in plain.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, pairs


def _tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).copy()) for t in gguf.GGUFReader(path).tensors}


def test_mxfp4_moe_equals_llama_quantize_and_runs_in_llama_cpp(checkpoint, tmp_path):
    """LoRA on attention and on the experts (so the experts are re-quantized, not the checkpoint's blocks), bf16:
    every tensor of our mxfp4_moe file has the type and bytes llama_model_quantize(MXFP4_MOE) writes from our bf16
    file (experts MXFP4, other matrices Q8_0 including token_embd and output, router/biases/sinks/norms F32), and
    llama.cpp's logits are within 15% of the logit range of ours, top-1 equal at half the positions or more
    (measured 0.114 and 0.81: the 4-bit rounding of the merged experts, whose pre-activations this tiny model drives
    past the clamp; test_gguf.py's q4_0 allowance; the exact-expert case below is the tight check)."""
    model, tok = FastLanguageModel.from_pretrained(str(checkpoint[0]), dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=4)  # default targets: attention and the stacked experts
    randomize_lora_b(model)
    model = FastLanguageModel.for_inference(model)
    bf16, ours = model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["bf16", "mxfp4_moe"],
                                            progress=False)
    assert ours.name == "model.MXFP4_MOE.gguf"
    theirs = _tensors(llama_quantize(bf16, tmp_path / "llama.gguf", "mxfp4_moe"))
    mine = _tensors(ours)
    assert mine.keys() == theirs.keys()
    assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}
    assert [k for k in mine if not np.array_equal(mine[k][1], theirs[k][1])] == []
    types = {k: v[0] for k, v in mine.items()}
    assert {types[k] for k in EXPERTS} == {"MXFP4"}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.ffn_gate_exps.bias"] == "F32"
    assert types["blk.0.attn_sinks.weight"] == "F32"
    reader = gguf.GGUFReader(ours)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    rel, top1, _ = compare_logits(model, tok, ours, PROMPTS, n_threads=1)
    print(f"mxfp4_moe (LoRA merged, re-quantized): rel {rel:.2e} top-1 {top1:.3f}")
    assert rel < 0.15 and top1 >= 0.5


def test_unchanged_mxfp4_checkpoint_keeps_its_blocks(checkpoint, tmp_path):
    """fp32, LoRA on attention only, so the experts are the checkpoint's: the file holds its MXFP4 blocks repacked
    as convert_hf_to_gguf.py does (each block's scale byte and its 32 codes are the checkpoint's, in ggml's order,
    and gguf-py's MXFP4 decoder gives transformers' decoding of the checkpoint), gate/up split from the interleaved
    rows. llama_model_quantize(MXFP4_MOE) of our f32 file gives the same expert values but other bytes in some
    blocks (a smaller scale for a block whose largest code is below 4, +0 for the checkpoint's -0 codes); every
    other tensor equals it. The experts being exact, llama.cpp's logits differ from ours by the Q8_0 rounding of
    attention, embeddings and output: within test_gguf.py's q8_0 allowance, 5% of the logit range, top-1 equal at
    90% of positions (measured 4.1e-2 and 0.94; the q8_0 file of this model: 4.3e-2, its f32 file: 6e-4)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, pairs = checkpoint
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    model = FastLanguageModel.for_inference(FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_lora_b(model)
    f32, ours = model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["f32", "mxfp4_moe"],
                                           progress=False)
    mine, theirs = _tensors(ours), _tensors(llama_quantize(f32, tmp_path / "llama.gguf", "mxfp4_moe"))
    requantized_blocks = 0
    for name in EXPERTS:
        layer, proj = int(name.split(".")[1]), name.split(".")[2].split("_")[1]
        blocks, scales = pairs[f"model.layers.{layer}.mlp.experts.{'down' if proj == 'down' else 'gate_up'}_proj"]
        rows = slice(None) if proj == "down" else slice(0 if proj == "gate" else 1, None, 2)
        blocks, scales = blocks[:, rows], scales[:, rows]
        expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(-1, -2)  # (E, out, in)
        data = mine[name][1]
        assert mine[name][0] == "MXFP4" and data.shape == (*expected.shape[:2], expected.shape[2] // 32 * 17)
        assert np.array_equal(data.reshape(-1, 17)[:, 0], scales.reshape(-1).numpy())
        decoded = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.MXFP4))
        assert torch.equal(decoded, expected)
        # the 4-bit codes themselves (-0 included, which both decoders read as 0): value j of a ggml block is the
        # low nibble of byte j (j < 16) or the high nibble of byte j - 16; the checkpoint's is nibble j % 2 of byte
        # j // 2
        ggml_bytes = torch.from_numpy(data.reshape(-1, 17)[:, 1:])
        ggml_codes = torch.cat((ggml_bytes & 0xF, ggml_bytes >> 4), 1)
        hf = blocks.reshape(-1, 16)
        assert torch.equal(ggml_codes, torch.stack((hf & 0xF, hf >> 4), -1).reshape(-1, 32))
        assert torch.equal(dequantize_mxfp4(theirs[name][1], expected.shape[2]).reshape(expected.shape), expected)
        requantized_blocks += int((data.reshape(-1, 17) != theirs[name][1].reshape(-1, 17)).any(1).sum())
    assert requantized_blocks > 0  # the repack is not what re-quantizing would write
    assert [k for k in mine if k not in EXPERTS and not np.array_equal(mine[k][1], theirs[k][1])] == []
    rel, top1, _ = compare_logits(model, tok, ours, PROMPTS, n_threads=1)
    print(f"mxfp4_moe (checkpoint blocks): rel {rel:.2e} top-1 {top1:.3f}")
    assert rel < 5e-2 and top1 >= 0.9


def test_cli_export_mxfp4(checkpoint, tmp_path, capsys):
    """fasttune export --quantization MXFP4 (the alias, any case) writes model.MXFP4_MOE.gguf with MXFP4 experts
    (the checkpoint's scale bytes: an fp32 load is unchanged too) and Q8_0 attention."""
    from fasttune.cli import main

    folder, pairs = checkpoint
    assert main(["export", "--model", str(folder), "--format", "gguf", "--quantization", "MXFP4",
                 "--output", str(tmp_path / "out")]) == 0
    path = tmp_path / "out" / "model.MXFP4_MOE.gguf"
    assert str(path) in capsys.readouterr().out
    tensors = _tensors(path)
    assert tensors["blk.1.ffn_down_exps.weight"][0] == "MXFP4" and tensors["blk.1.attn_v.weight"][0] == "Q8_0"
    scales = pairs["model.layers.1.mlp.experts.down_proj"][1]
    assert np.array_equal(tensors["blk.1.ffn_down_exps.weight"][1].reshape(-1, 17)[:, 0], scales.reshape(-1).numpy())


def test_mxfp4_moe_on_a_dense_model_is_a_config_error(bpe, tmp_path):
    """A model without experts: refused before anything is written, naming q8_0 (what MXFP4_MOE makes of it)."""
    save_hf(hf_model("llama", vocab_size=416), tmp_path / "m", bpe)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="has no experts.*'q8_0'"):
        model.save_pretrained_gguf(tmp_path / "out", tok, quantization_method=["q8_0", "mxfp4_moe"], progress=False)
    assert not (tmp_path / "out").exists()
