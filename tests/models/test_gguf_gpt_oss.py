"""gpt-oss GGUF files load onto our decoder (models/gguf_file.py's own reverse mapping: transformers 5.24's GGUF
reader does not take gpt-oss). The tiny gpt-oss of tests/tiny.py (sinks, biases, sliding + full layer, yarn, 4
experts top-2, experts rounded to MXFP4 values) exported with save_pretrained_gguf in f32/f16/q8_0/mxfp4_moe loads
back with its config, tokenizer and logits, and trains LoRA; a file laid out as llama.cpp's converter writes OpenAI's
MXFP4 experts loads as exactly the MXFP4 values; missing tensors and types gguf cannot dequantise are ModelLoadErrors
naming the tensor."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from bpe_tokenizers import make_bpe_tokenizer
from tiny import hf_config, hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.models.config import ModelConfig
from fasttune.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4

IDS = torch.randint(3, 416, (2, 12), generator=torch.Generator().manual_seed(3))  # 12 tokens: past the window 4
QUANTS = ("f32", "f16", "q8_0")


def _mxfp4_experts(model):
    """Round the experts of a transformers gpt-oss to MXFP4-representable values (in place); returns OpenAI's
    (blocks, scales) per expert stack, as a published gpt-oss checkpoint stores them."""
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(p)  # (E, out, in/32, 16), (E, out, in/32)
                p.copy_(dequantize_mxfp4(blocks, scales))
                packed[name] = blocks, scales
    return packed


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(reference model, its tokenizer, {method: GGUF path}, OpenAI MXFP4 expert blocks) of the tiny gpt-oss, its
    experts already MXFP4 values so the same reference serves the MXFP4 files."""
    folder = tmp_path_factory.mktemp("gpt_oss_gguf")
    hf = hf_model("gpt_oss", vocab_size=416)
    packed = _mxfp4_experts(hf)
    save_hf(hf, folder / "hf", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(folder / "hf"))
    methods = [*QUANTS, "mxfp4_moe"]
    paths = model.save_pretrained_gguf(folder / "m.gguf", tok, quantization_method=methods, progress=False,
                                       modelfile=False)
    return model, tok, dict(zip(methods, paths)), packed


def _rewrite(src, dst, replace=None, drop=(), drop_keys=()):
    """Copy a GGUF file with gguf's reader and writer: tensors in `drop` and metadata keys in `drop_keys` left out,
    tensors in `replace` (name -> (array, raw_dtype)) stored as given."""
    import gguf

    replace = replace or {}
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in replace:
            data, raw = replace[t.name]
            writer.add_tensor(t.name, data, raw_dtype=raw)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return dst


def _ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """OpenAI's MXFP4 (blocks (..., G, 16): byte b holds codes 2b (low nibble) and 2b + 1 (high); scales (..., G),
    E8M0) -> ggml's MXFP4 rows (..., G * 17): per block the E8M0 byte, then bytes j holding codes j (low) and j + 16
    (high) (ggml-common.h's block_mxfp4; the layout convert_hf_to_gguf.py's repack_mxfp4 writes). The scale byte is
    the same: ggml takes half of 2^(e - 127) times the doubled E2M1 value."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # (..., G, 32) in value order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([scales.unsqueeze(-1), qs], dim=-1).flatten(-2).numpy()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_config_and_tokenizer_equal_the_exported_model(exported):
    ref, tok, paths, _ = exported
    model, got_tok = FastLanguageModel.from_pretrained(str(paths["f32"]))
    want, got = hf_config("gpt_oss", vocab_size=416), model.hf_config
    assert got.model_type == "gpt_oss"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "layer_types",
                  "num_local_experts", "num_experts_per_tok", "rope_parameters", "tie_word_embeddings",
                  "swiglu_limit", "attention_bias"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.rope_parameters == {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32}
    assert got.rms_norm_eps == np.float32(want.rms_norm_eps)  # GGUF stores it as float32
    ours, theirs = dataclasses.asdict(model.arch), dataclasses.asdict(ModelConfig.from_hf(want))
    assert math.isclose(ours.pop("rms_norm_eps"), theirs.pop("rms_norm_eps"), rel_tol=1e-7)
    # the GGUF records the tokenizer's end token (as for every family), not the tiny config's placeholder 0
    assert ours.pop("eos_token_id") == tok.eos_token_id == 2 and theirs.pop("eos_token_id") == 0
    assert ours == theirs  # the decoder's whole view: sinks, windows per layer, yarn, MoE block, SwiGLU limits
    assert got_tok.chat_template == tok.chat_template
    for text in ("The quick brown fox.", "  two spaces\n\nand\ttabs, 12345"):
        assert got_tok(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.parametrize("quant", QUANTS)
def test_logits_equal_the_model_before_export(exported, quant):
    """f32: every parameter and the logits bit for bit (the reverse mapping is exact). f16: every parameter within
    f16's rounding (rtol 1e-3), logits within 2e-3 relative (measured 2.2e-4), top-1 equal. q8_0: every parameter
    within its tensor's Q8_0 step (largest magnitude / 127; a wrong transpose or interleave is far outside it),
    logits within 3e-2 relative (measured 1.5e-2; this random model's near-flat logits leave top-1 equal at 79% of
    positions, so it is not asserted)."""
    ref, _, paths, _ = exported
    model, _ = FastLanguageModel.from_pretrained(str(paths[quant]))
    theirs = ref.state_dict()
    want, got = _logits(ref), _logits(model)
    for name, t in model.state_dict().items():
        if quant == "f32":
            assert torch.equal(t, theirs[name]), name
        elif quant == "f16" or t.dim() == 1 or name.endswith("_bias") or "router" in name:  # f16 / kept f32
            torch.testing.assert_close(t, theirs[name], rtol=1e-3, atol=1e-7, msg=name)
        else:
            step = theirs[name].abs().max() / 127
            assert (t - theirs[name]).abs().max() <= step, name
    if quant == "f32":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < {"f16": 2e-3, "q8_0": 3e-2}[quant], rel
    if quant == "f16":
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_loaded_gguf_trains_lora(exported):
    """LoRA on attention and the experts (the default targets) of a q8_0 file: a forward/backward with finite,
    non-zero gradients on every adapter tensor, and a step lowers the loss."""
    _, _, paths, _ = exported
    model, _ = FastLanguageModel.from_pretrained(str(paths["q8_0"]))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:  # B starts at zero: give A a gradient too
            torch.nn.init.normal_(p, std=0.02)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trainable) and any("q_proj" in n for n in trainable)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in trainable.values():
            p -= 0.05 * p.grad
    assert model(IDS, labels=IDS).loss.item() < loss.item()


def test_llama_cpp_mxfp4_experts_load_as_their_values(exported, tmp_path):
    """A file as llama.cpp's convert_hf_to_gguf.py writes OpenAI's MXFP4 gpt-oss: the expert weights repacked into
    ggml's MXFP4 blocks (gate rows 0, 2, ... and up rows 1, 3, ... of gate_up_proj, down as it is), everything else
    as in our f32 file. The experts load as exactly the MXFP4 values, so the logits equal the reference's."""
    import gguf

    ref, _, paths, packed = exported
    replace = {}
    for layer in range(2):
        blocks, scales = packed[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        for part, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            replace[f"blk.{layer}.ffn_{part}_exps.weight"] = (_ggml_mxfp4(blocks[:, rows], scales[:, rows]),
                                                             gguf.GGMLQuantizationType.MXFP4)
        blocks, scales = packed[f"model.layers.{layer}.mlp.experts.down_proj"]
        replace[f"blk.{layer}.ffn_down_exps.weight"] = (_ggml_mxfp4(blocks, scales), gguf.GGMLQuantizationType.MXFP4)
    path = _rewrite(paths["f32"], tmp_path / "mxfp4.gguf", replace)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors if "_exps.weight" in t.name} == {"MXFP4"}
    model, _ = FastLanguageModel.from_pretrained(str(path))
    theirs = ref.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)


def test_our_mxfp4_moe_export_loads_back(exported):
    """save_pretrained_gguf's mxfp4_moe (llama-quantize's MXFP4_MOE: experts MXFP4, other matrices Q8_0) reads back
    with the experts exactly the reference's MXFP4 values; logits within 3e-2 relative (measured 5.5e-3)."""
    import gguf

    ref, _, paths, _ = exported
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(paths["mxfp4_moe"])).tensors}
    assert kinds["blk.0.ffn_gate_exps.weight"] == kinds["blk.1.ffn_down_exps.weight"] == "MXFP4"
    model, _ = FastLanguageModel.from_pretrained(str(paths["mxfp4_moe"]))
    theirs = ref.state_dict()
    for name, t in model.state_dict().items():
        if ".experts." in name or t.dim() == 1:
            assert torch.equal(t, theirs[name]), name
    want, got = _logits(ref), _logits(model)
    assert ((got - want).norm() / want.norm()).item() < 3e-2


def test_mxfp4_dequantize_equals_gguf_for_every_scale():
    """The torch MXFP4 path of dequantize_fast gives gguf's bits for all 256 E8M0 exponents (the subnormal half
    scales of 0 and 1, and 255 whose largest values overflow to inf in both) and random nibbles."""
    import gguf

    from fasttune.models.gguf_file import dequantize_fast

    rng = np.random.default_rng(1)
    raw = np.concatenate([np.arange(256, dtype=np.uint8)[:, None], rng.integers(0, 256, (256, 16), dtype=np.uint8)],
                         axis=1).reshape(8, 32 * 17)
    got = dequantize_fast(raw, gguf.GGMLQuantizationType.MXFP4)
    with np.errstate(over="ignore"):
        want = gguf.dequantize(raw, gguf.GGMLQuantizationType.MXFP4)
    assert got.shape == want.shape == (8, 1024)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("drop, message", [
    ("blk.1.attn_sinks.weight", r"no tensor blk\.1\.attn_sinks\.weight \(model\.layers\.1\.self_attn\.sinks\)"),
    ("blk.0.ffn_up_exps.weight", r"has blk\.0\.ffn_gate_exps\.weight but no blk\.0\.ffn_up_exps\.weight"),
    ("blk.1.ffn_down_exps.bias", r"no tensor blk\.1\.ffn_down_exps\.bias"),
])
def test_missing_tensor_is_a_model_load_error_naming_it(exported, tmp_path, drop, message):
    _, _, paths, _ = exported
    path = _rewrite(paths["f32"], tmp_path / "missing.gguf", drop=(drop,))
    with pytest.raises(ModelLoadError, match=message):
        FastLanguageModel.from_pretrained(str(path))


def test_unsupported_tensor_type_is_a_model_load_error_naming_it(exported, tmp_path):
    """Q8_1 (llama.cpp's intermediate type, never dequantised by gguf-py) in place of an attention weight."""
    import gguf

    _, _, paths, _ = exported
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    q8_1 = np.zeros((256, 64 // block * size), dtype=np.uint8)  # the (256, 64) weight's bytes
    path = _rewrite(paths["f32"], tmp_path / "q8_1.gguf",
                    {"blk.0.attn_q.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)})
    with pytest.raises(ModelLoadError, match=r"tensor 'blk\.0\.attn_q\.weight' is stored as GGML type Q8_1.*"
                                             r"pip install -U gguf.*llama-quantize"):
        FastLanguageModel.from_pretrained(str(path))


def test_no_sliding_window_is_a_model_load_error(exported, tmp_path):
    _, _, paths, _ = exported
    path = _rewrite(paths["f32"], tmp_path / "nowindow.gguf", drop_keys=("gpt-oss.attention.sliding_window",))
    with pytest.raises(ModelLoadError, match=r"no gpt-oss\.attention\.sliding_window, which llama\.cpp's gpt-oss"):
        FastLanguageModel.from_pretrained(str(path))


def test_fast_false_says_to_drop_it(exported):
    """transformers cannot read a gpt-oss GGUF; with fast=False the error says our decoder can, not that the
    architecture is unsupported."""
    _, _, paths, _ = exported
    with pytest.raises(ModelLoadError, match=r"fast=False / --no-fast asks transformers .* fasttune's own decoder "
                                             r"reads this 'gpt_oss' model: load it without fast=False") as e:
        FastLanguageModel.from_pretrained(str(paths["f32"]), fast=False)
    assert "is not supported by fasttune's fast decoder" not in str(e.value)
