"""Importance-matrix (imatrix) k-quants (issue #19): the weighted quantizers of export/kquants.py against ggml's own
`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` from llama-cpp-python's bundled libggml-base,
byte for byte; the collection (export/imatrix.py) on a tiny model; the GGUF plumbing and its errors."""
import ctypes
import json

import numpy as np

import pytest
import torch
from llama_cpp_check import ggml_lib, ggml_quantize

from fasttune.export import kquants

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

WEIGHTED = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS"]


@pytest.fixture(scope="module")
def ggml():
    """ggml_quantize_chunk(name, x (rows, n_per_row) float32, imatrix (n_per_row,) float32 or None) -> bytes."""
    lib = ggml_lib()
    return lambda x, name, imatrix: ggml_quantize(lib, x, name, imatrix)


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    shape = (8, 512)
    special = torch.zeros(8, 512)
    special[1] = 0.3  # constant block
    special[2] = -u(512)  # negative only
    special[3] = 1e-30 * r(512)  # tiny
    special[4] = r(512) * 1e15  # huge: x^2 overflows, the weights are inf
    special[5] = torch.where(u(512) < 0.05, r(512), torch.zeros(512))  # mostly zeros
    special[6, ::2] = 1.0  # ties
    special[7] = -0.0  # signed zeros (ggml keeps -0.0 as the block minimum)
    xs = {"normal": r(*shape) * 0.02, "student_t": torch.distributions.StudentT(3.0).sample(shape) * 0.01,
          "grid": torch.randint(-8, 8, shape, generator=g).float() * 0.125, "positive": u(*shape) + 1,
          "special": special}
    ws = {"uniform": u(512) + 0.01, "lognormal": torch.exp(3 * r(512)),  # activations' mean squares vary a lot
          "sparse": torch.where(u(512) < 0.3, u(512), torch.zeros(512)), "zeros": torch.zeros(512),
          "huge": u(512) * 1e30}
    return xs, ws


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_weighted_quantizer_bytes_equal_ggml(qtype, ggml):
    """Every block byte-identical to ggml_quantize_chunk with an imatrix (quantize_row_<type>_impl), for each
    input against each kind of random non-negative importance, and different from the unweighted bytes."""
    size = kquants.BLOCKS[qtype][1]
    xs, ws = _inputs()
    x = torch.cat(list(xs.values()))  # one call per importance vector; rows name their input on failure
    names = [name for name, v in xs.items() for _ in range(len(v))]
    for wname, qw in ws.items():
        ours = kquants.quantize(x, qtype, qw).reshape(len(x), -1, size)
        theirs = ggml(x.numpy(), qtype, qw.numpy()).reshape(len(x), -1, size)
        same = (ours == theirs).all(2)
        bad = sorted({names[r] for r in np.nonzero(~same.all(1))[0]})
        assert same.all(), f"{qtype} with {wname} importance: {int((~same).sum())} blocks differ in inputs {bad}"
    assert (kquants.quantize(xs["normal"], qtype, ws["lognormal"]) != kquants.quantize(xs["normal"], qtype)).any()


def test_q8_0_ignores_the_imatrix_as_ggml_does(ggml):
    x, qw = torch.randn(4, 256), torch.rand(256)
    assert np.array_equal(kquants.quantize(x, "Q8_0", qw), ggml(x.numpy(), "Q8_0", qw.numpy()))
    assert np.array_equal(kquants.quantize(x, "Q8_0", qw), kquants.quantize(x, "Q8_0"))


def test_weighted_quantize_bad_imatrix():
    x = torch.randn(4, 512)
    with pytest.raises(ValueError, match="needs 512 values"):
        kquants.quantize(x, "Q4_K", torch.rand(256))
    with pytest.raises(ValueError, match="negative or non-finite"):
        kquants.quantize(x, "Q4_0", torch.full((512,), float("nan")))
    with pytest.raises(ValueError, match="negative or non-finite"):
        kquants.quantize(x, "Q6_K", -torch.rand(512))


# ------------------------------------------------------------------------------------------- collection and export

SIZES = dict(hidden_size=256, intermediate_size=512, head_dim=64)  # rows divide into 256-blocks: K types apply
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6, "A stitch in time saves nine; measure twice. " * 6,
         "Importance matrices weight the levels where the inputs are large. " * 4]


@pytest.fixture
def lora_model(tmp_path):
    """A tiny llama (2 layers, hidden 256) with a trained-looking LoRA, and its BPE tokenizer."""
    from bpe_tokenizers import make_bpe_tokenizer
    from tiny import hf_model, save_hf

    from fasttune import FastLanguageModel

    folder = save_hf(hf_model("llama", vocab_size=416, **SIZES), tmp_path / "llama", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model, tok


def test_collect_matches_llama_imatrix_statistic(lora_model):
    """One entry per blk.N matrix (llama.cpp's names), counts = tokens, in_sum2 = sum over tokens of the squared
    input features: equal for q/k/v and for gate/up (one input each), and for q equal to the first layer's normed
    embeddings computed directly; no entry for the embedding or the output. The model's train mode is restored."""
    from fasttune.export.imatrix import collect_imatrix, sample_token_ids

    model, tok = lora_model
    model.train()
    ids, source = sample_token_ids(TEXTS, tok, max_tokens=150)
    assert len(ids) == 150 and source == "3 texts"
    im = collect_imatrix(model, ids, chunk_tokens=64, progress=False)
    assert model.training and im.chunk_count == 3
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(im.sums) == {f"blk.{i}.{k}.weight" for i in range(2) for k in kinds}
    assert set(im.counts.values()) == {150}
    assert im.sums["blk.0.ffn_down.weight"].shape == (512,) and im.sums["blk.0.attn_q.weight"].shape == (256,)
    for i in range(2):
        assert torch.equal(im.sums[f"blk.{i}.attn_q.weight"], im.sums[f"blk.{i}.attn_v.weight"])
        assert torch.equal(im.sums[f"blk.{i}.ffn_gate.weight"], im.sums[f"blk.{i}.ffn_up.weight"])
    with torch.no_grad():
        layer = model.model.layers[0]
        x = layer.input_layernorm(model.model.embed_tokens(torch.tensor([ids]))).float()
    torch.testing.assert_close(im.sums["blk.0.attn_q.weight"], x.square().sum((0, 1)).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(im.weights("blk.1.ffn_down.weight"), (im.sums["blk.1.ffn_down.weight"] / 150).float())
    assert im.weights("output.weight") is None


def test_gguf_with_imatrix_equals_ggml_per_tensor(lora_model, ggml, tmp_path):
    """q4_k_m and q5_0 with an importance matrix collected from a text file: every blk.N matrix equals
    ggml_quantize_chunk of our f32 export's tensor with that matrix's weights; the others (embedding, output) equal
    the unweighted quantization; the types are the method's; llama-quantize's imatrix keys are set; llama.cpp runs
    the file."""
    from fasttune.export.imatrix import collect_imatrix, sample_token_ids

    model, tok = lora_model
    text = tmp_path / "sample.txt"
    text.write_text(" ".join(TEXTS))
    paths = model.save_pretrained_gguf(tmp_path / "out", tok, quantization_method=["f32", "q4_k_m", "q5_0"],
                                       imatrix=str(text), imatrix_tokens=120, progress=False)
    im = collect_imatrix(model, sample_token_ids(str(text), tok, 120)[0], progress=False)
    f32 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(paths[0]).tensors}
    for path in paths[1:]:
        reader = gguf.GGUFReader(path)
        assert reader.fields["quantize.imatrix.entries_count"].contents() == 14
        assert str(text) in reader.fields["quantize.imatrix.dataset"].contents()
        weighted = 0
        for t in reader.tensors:
            if t.tensor_type.name in ("F32", "F16"):
                continue
            qw = im.weights(t.name)
            theirs = ggml(f32[t.name].reshape(-1, f32[t.name].shape[-1]), t.tensor_type.name,
                          None if qw is None else qw.numpy())
            assert np.asarray(t.data).tobytes() == theirs.tobytes(), f"{path.name}: {t.name}"
            weighted += qw is not None
        assert weighted == 14
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        if "Q4_K_M" in path.name:
            assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
        llm = llama_cpp.Llama(str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
        ids = tok("The quick brown fox")["input_ids"]
        llm.eval(ids)
        # (without logits_all only the last position's row is written; the others hold whatever memory held)
        assert np.isfinite(np.asarray(llm.scores[:len(ids)])).all()
        llm.close()


def test_imatrix_file_round_trip_and_llama_cpp_reads_it(lora_model, tmp_path):
    """save_imatrix writes llama.cpp's GGUF imatrix layout: ggml's own gguf reader (libggml-base) finds
    general.type = imatrix, the chunk keys and, per matrix, <name>.in_sum2 and <name>.counts in F32 of the right
    sizes; load_imatrix reads it back, and an export given that file writes the same bytes as one that collects."""
    from fasttune.export.imatrix import collect_imatrix, load_imatrix, sample_token_ids, save_imatrix

    model, tok = lora_model
    im = collect_imatrix(model, sample_token_ids(TEXTS, tok, 100)[0], progress=False, dataset="texts")
    path = save_imatrix(im, tmp_path / "imatrix.gguf")

    lib = ggml_lib()

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    for fn, res, args in [("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
                          ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
                          ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_free", None, [ctypes.c_void_p])]:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx
    try:
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")) == b"imatrix"
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_count")) == 1
        found = {lib.gguf_get_tensor_name(ctx, i).decode(): (lib.gguf_get_tensor_type(ctx, i),
                                                             lib.gguf_get_tensor_size(ctx, i))
                 for i in range(lib.gguf_get_n_tensors(ctx))}
    finally:
        lib.gguf_free(ctx)
    assert len(found) == 28
    assert found["blk.0.ffn_down.weight.in_sum2"] == (0, 512 * 4) and found["blk.0.ffn_down.weight.counts"] == (0, 4)

    back = load_imatrix(path)
    assert back.datasets == ["texts"] and back.counts == im.counts and back.chunk_size == im.chunk_size
    for name in im.sums:
        assert torch.equal(back.weights(name), im.weights(name))  # the sums are stored in float32
    a = model.save_pretrained_gguf(tmp_path / "a.gguf", tok, quantization_method="q4_k_m", imatrix=str(path),
                                   progress=False, modelfile=False)
    b = model.save_pretrained_gguf(tmp_path / "b.gguf", tok, quantization_method="q4_k_m", imatrix=im,
                                   progress=False, modelfile=False)
    data = lambda p: {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(p).tensors}  # noqa: E731
    assert data(a) == data(b)


def test_imatrix_errors_name_the_fix(lora_model, tmp_path):
    from fasttune.errors import ConfigError
    from fasttune.export.imatrix import Imatrix

    model, tok = lora_model
    save = lambda **kw: model.save_pretrained_gguf(tmp_path / "out" / "m.gguf", tok, progress=False, **kw)  # noqa
    with pytest.raises(ConfigError, match="no effect on quantization_method f16, q8_0.*q4_k_m"):
        save(quantization_method=["f16", "q8_0"], imatrix=TEXTS)
    with pytest.raises(ConfigError, match="imatrix=True does not say which text.*train.jsonl"):
        save(quantization_method="q4_k_m", imatrix=True)
    with pytest.raises(ConfigError, match="imatrix_tokens=4: use an integer >= 16"):
        save(quantization_method="q4_k_m", imatrix=TEXTS, imatrix_tokens=4)
    with pytest.raises(ConfigError, match="Cannot read the imatrix sample text"):
        save(quantization_method="q4_k_m", imatrix=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="fewer than 2 tokens"):
        save(quantization_method="q4_k_m", imatrix=[""])
    q = "blk.0.attn_q.weight"
    other = Imatrix(sums={q: torch.ones(128, dtype=torch.float64)}, counts={q: 1})
    with pytest.raises(ConfigError, match=r"blk.0.attn_q.weight has shape \(128,\) but the tensor is \(256, 256\)"):
        save(quantization_method="q4_k_m", imatrix=other)
    with pytest.raises(ConfigError, match="names a tensor of this model"):
        save(quantization_method="q4_k_m", imatrix=Imatrix(sums={"x.weight": torch.ones(4)}, counts={"x.weight": 1}))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ConfigError, match="Cannot read the imatrix file"):
        save(quantization_method="q4_k_m", imatrix=str(tmp_path / "bad.gguf"))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_cli_imatrix(lora_model, tmp_path, capsys):
    """fasttune export --imatrix --imatrix-data: the weighted file; --imatrix alone, with f16 or with --format merged:
    exit code 2 and one paragraph naming the fix, before the model loads."""
    from fasttune.cli import main

    model, tok = lora_model
    model.save_pretrained(tmp_path / "adapter", tok)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    base = ["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]
    assert main([*base, "--quantization", "q4_k_m", "--imatrix", "--imatrix-data", str(data),
                 "--imatrix-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"importance matrix from {data} weighted the quantizers of q4_k_m" in out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["quantize.imatrix.entries_count"].contents() == 14
    for extra, message in [(["--quantization", "q4_k_m", "--imatrix"], "--imatrix needs --imatrix-data FILE"),
                           (["--quantization", "f16", "--imatrix-data", str(data)], "no effect on --quantization f16"),
                           (["--quantization", "q4_k_m", "--imatrix-data", str(tmp_path / "nope.jsonl")],
                            "no such file")]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    # `fasttune train` records its data beside the adapter: --imatrix alone measures on it
    (tmp_path / "fasttune_run.json").write_text(json.dumps({"method": "sft", "data": str(data)}))
    assert main([*base, "--quantization", "q4_k_m", "--imatrix", "--imatrix-tokens", "64"]) == 0
    assert f"training data recorded in {tmp_path / 'fasttune_run.json'}: {data}" in capsys.readouterr().out


def test_qwen3_5_ssm_out_entry_follows_the_gguf_column_order(tmp_path):
    """Qwen3.5: the DeltaNet layers' entries are collected (attn_qkv, attn_gate, ssm_alpha/beta, ssm_out), and
    ssm_out's, whose columns are value heads, comes in the export's tiled head order (llama.cpp's)."""
    from bpe_tokenizers import make_bpe_tokenizer
    from tiny import hf_model, save_hf

    from fasttune import FastLanguageModel
    from fasttune.export.gguf_qwen35 import _tile_heads
    from fasttune.export.imatrix import collect_imatrix, sample_token_ids

    folder = save_hf(hf_model("qwen3_5_text", vocab_size=416), tmp_path / "q", make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    ids, _ = sample_token_ids(TEXTS, tok, max_tokens=100)
    seen = []
    handle = model.model.layers[0].linear_attn.out_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().square().sum(0)))
    im = collect_imatrix(model, ids, chunk_tokens=64, progress=False)
    handle.remove()
    assert {"blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_alpha.weight",
            "blk.0.ssm_out.weight", "blk.3.attn_q.weight"} <= set(im.sums)
    ours = torch.stack(seen).sum(0).double()
    tiled = _tile_heads(ours, 0, 2, 2, 16)  # 2 key heads serving 2 value heads each, 16 wide
    assert not torch.equal(tiled, ours)
    torch.testing.assert_close(im.sums["blk.0.ssm_out.weight"], tiled, rtol=1e-5, atol=1e-6)
