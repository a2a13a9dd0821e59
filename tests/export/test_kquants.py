"""GGML quantizers (export/kquants.py) and llama.cpp's quantization mixtures (export/gguf_types.py) against
llama.cpp itself, through llama-cpp-python's bundled ggml: ggml_quantize_chunk for the bytes of each block type,
llama_model_quantize on our f32 GGUF for the per-tensor type choice and bytes of each mixture."""

import numpy as np
import pytest
import torch
from llama_cpp_check import ggml_lib, ggml_quantize, llama_quantize

from fasttune.export import kquants

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"]
METHODS = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
           "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs"]


@pytest.fixture(scope="module")
def ggml():
    lib = ggml_lib()
    return lambda x, name: ggml_quantize(lib, x, name)


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    shape = (32, 1024)
    special = torch.zeros(8, 1024)
    special[1] = 0.3  # constant block
    special[2] = -u(1024)  # negative only
    special[3, :256] = 1e-30 * r(256)  # tiny (products underflow)
    special[3, 256:] = r(768) * 1e-38  # subnormal
    special[4] = r(1024) * 1e15  # huge (x**3 overflows to inf in the weighted fits)
    special[5] = torch.where(u(1024) < 0.05, r(1024), torch.zeros(1024))  # mostly zeros
    special[6, ::2] = 1.0  # two values: ties in the rounding
    special[7] = -0.0
    return {
        "normal": r(*shape) * 0.02,
        "student_t": torch.distributions.StudentT(3.0).sample(shape) * 0.01,
        "grid": torch.randint(-8, 8, shape, generator=g).float() * 0.125,  # exact halves everywhere
        "bf16_weights": (r(*shape) * 0.05).bfloat16().float(),
        "outliers": r(*shape) * 0.02 * (1 + 50 * (u(*shape) < 0.002)),
        "positive": u(*shape) + 1,
        "special": special,
    }


@pytest.mark.parametrize("qtype", TYPES)
def test_quantizer_bytes_equal_ggml(qtype, ggml):
    """Every block is byte-identical to ggml_quantize_chunk (no imatrix = the quantize_row_*_ref functions)."""
    size = kquants.BLOCKS[qtype][1]
    for name, x in _cases().items():
        ours = kquants.quantize(x, qtype).reshape(-1, size)
        theirs = ggml(x.numpy(), qtype).reshape(-1, size)
        same = (ours == theirs).all(1)
        assert same.all(), f"{qtype} {name}: {int((~same).sum())} of {len(same)} blocks differ"


def test_quantize_shapes_and_errors():
    out = kquants.quantize(torch.randn(3, 2, 512), "Q4_K")
    assert out.dtype == np.uint8 and out.shape == (6, 2 * 144)
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(torch.randn(4, 96), "Q6_K")
    with pytest.raises(ValueError, match="no quantizer"):
        kquants.quantize(torch.randn(4, 256), "IQ2_XS")


# --------------------------------------------------------------------------------------------------- mixtures

SIZES = dict(hidden_size=256, intermediate_size=512, head_dim=64)  # rows divide into 256-blocks


@pytest.fixture
def model_dir(tmp_path):
    """Factory: a tiny random HF model of `family` with a 400-token BPE tokenizer (vocab 416), saved to a folder."""
    from bpe_tokenizers import make_bpe_tokenizer
    from tiny import hf_model, save_hf

    tok = make_bpe_tokenizer("gpt2")

    def make(family, **overrides):
        return save_hf(hf_model(family, vocab_size=416, **overrides), tmp_path / family, tok)

    return make


def _export(folder, tmp_path, methods):
    from fasttune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(folder))
    out = model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method=["f32", *methods], progress=False)
    return out[0], dict(zip(methods, out[1:]))


def _tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def _compare(ours_path, theirs_path):
    ours, theirs = _tensors(ours_path), _tensors(theirs_path)
    assert ours.keys() == theirs.keys()
    types = {k: (ours[k][0], theirs[k][0]) for k in ours if ours[k][0] != theirs[k][0]}
    assert not types, f"types differ (ours, llama.cpp): {types}"
    differ = [k for k in ours if ours[k][1] != theirs[k][1]]
    assert not differ, f"bytes differ: {differ}"
    return {k: v[0] for k, v in ours.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma", "mistral", "qwen3", "gemma2", "gemma3_text",
                                    "qwen3_5_text"])
def test_mixtures_equal_llama_quantize(family, model_dir, tmp_path):
    """Per tensor, the type llama-quantize picks and the bytes it writes, for every method, on a 2-layer model
    whose rows divide into 256-blocks, for every family we export (separate or tied output; phi3: fused qkv)."""
    methods = METHODS if family == "llama" else ["q2_k", "q3_k_m", "q4_k_m", "q5_k_s", "q6_k"]
    # Gemma 2/3 scale queries by query_pre_attn_scalar**-0.5, which llama.cpp takes from head_dim
    extra = {"query_pre_attn_scalar": SIZES["head_dim"]} if family in ("gemma2", "gemma3_text") else {}
    f32, ours = _export(model_dir(family, **SIZES, **extra), tmp_path, methods)
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        if method == "q4_k_m" and family == "qwen3_5_text":  # DeltaNet layers' conv stays F32
            assert types["blk.0.ssm_conv1d.weight"] == "F32" and types["blk.0.ssm_a"] == "F32"
        elif method == "q4_k_m":  # the "more bits" layer of 2 is the last one
            v = "attn_qkv" if family == "phi3" else "attn_v"
            assert types[f"blk.0.{v}.weight"] == "Q4_K" and types[f"blk.1.{v}.weight"] == "Q6_K"
            assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_q.weight" if v == "attn_v"
                                                                           else "blk.0.ffn_up.weight"] == "Q4_K"
            assert types["output.weight" if "output.weight" in types else "token_embd.weight"] == "Q6_K"


@pytest.mark.parametrize("family, experts, methods", [
    ("qwen3_moe", 4, ["q8_0", "q4_k_m", "q3_k_m", "mxfp4_moe"]),
    ("mixtral", 8, ["q8_0", "q4_k_m", "q2_k", "mxfp4_moe"]),  # 8 experts: Mixtral-8x7B's attn_v/attn_k/attn_output
])
def test_moe_mixtures_equal_llama_quantize(family, experts, methods, model_dir, tmp_path):
    """MoE: the 3-D expert tensors (ffn_{gate,up,down}_exps, quantized as E * out rows, ffn_down_exps' layer read
    from its name), the f32 router and llama.cpp's 8-expert rules, against llama_model_quantize of our f32 file;
    mxfp4_moe (MXFP4 experts) too.
    (All 14 methods were compared for both families with 4 and 8 experts when this was written; a subset runs.)"""
    n = {"num_experts": experts, "moe_intermediate_size": 256, "mlp_only_layers": []} if family == "qwen3_moe" \
        else {"num_local_experts": experts}
    f32, ours = _export(model_dir(family, hidden_size=256, intermediate_size=256, head_dim=64, **n), tmp_path,
                        methods)
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"
        if method == "q4_k_m":
            assert types["blk.0.ffn_up_exps.weight"] == "Q4_K" and types["blk.1.ffn_down_exps.weight"] == "Q6_K"
            assert types["blk.0.attn_v.weight"] == ("Q8_0" if experts == 8 else "Q4_K")
            assert types["blk.0.attn_output.weight"] == ("Q5_K" if experts == 8 else "Q4_K")
        if method == "mxfp4_moe":  # experts MXFP4, every other matrix Q8_0 (8 experts or not)
            assert types["blk.1.ffn_down_exps.weight"] == "MXFP4" and types["blk.0.attn_output.weight"] == "Q8_0"


def test_gpt_oss_mixtures_equal_llama_quantize(model_dir, tmp_path):
    """gpt-oss ("gpt-oss", hidden and expert width 256): q8_0, q4_k_m and q4_0 (sinks, biases, 2-D expert biases
    kept F32, 3-D experts split from the interleaved gate_up) have llama_model_quantize's types and bytes for every
    tensor."""
    folder = model_dir("gpt_oss", hidden_size=256, intermediate_size=256)
    f32, ours = _export(folder, tmp_path, ["q8_0", "q4_k_m", "q4_0"])
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        assert types["blk.0.ffn_gate_exps.bias"] == "F32" and types["blk.0.attn_sinks.weight"] == "F32"
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"
        if method == "q8_0":
            assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0"
        if method == "q4_k_m":
            assert types["blk.0.ffn_up_exps.weight"] == "Q4_K" and types["blk.1.ffn_down_exps.weight"] == "Q6_K"


def test_mixture_layer_rules_and_gqa(model_dir, tmp_path):
    """9 layers (the more-bits pattern of llama.cpp's use_more_bits), GQA 4 (q2_k's attn_v in Q4_K)."""
    folder = model_dir("llama", hidden_size=256, intermediate_size=256, head_dim=32, num_attention_heads=8,
                            num_key_value_heads=2, num_hidden_layers=9)
    methods = ["q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_xs"]
    f32, ours = _export(folder, tmp_path, methods)
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        if method == "q4_k_m":
            assert [types[f"blk.{i}.attn_v.weight"] for i in range(9)] == \
                ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K", "Q6_K"]
        if method == "q2_k":
            assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q3_K"
        if method == "iq4_xs":  # GQA >= 4: attn_v in Q5_K; without an imatrix the first eighth's ffn_down in Q5_K
            assert types["blk.0.attn_v.weight"] == "Q5_K" and types["blk.0.ffn_down.weight"] == "Q5_K"
            assert types["blk.1.ffn_down.weight"] == "IQ4_XS" and types["output.weight"] == "Q6_K"


def test_small_rows_fall_back_as_llama_cpp_does(model_dir, tmp_path):
    """Hidden 64: no row divides into 256-blocks, so the k-types fall back (Q4_K -> Q5_0, Q6_K -> Q8_0, ...) and
    IQ4_XS to IQ4_NL."""
    f32, ours = _export(model_dir("qwen3"), tmp_path, ["q4_k_m", "q3_k_l", "iq4_xs"])
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        assert set(types.values()) <= {"F32", "Q5_0", "Q8_0", "Q4_0", "Q5_1", "IQ4_NL"}
        assert method != "iq4_xs" or types["blk.0.ffn_up.weight"] == "IQ4_NL"


def test_iq4_ffn_down_rule_follows_the_imatrix():
    """llama-quantize raises the first eighth of the layers' ffn_down to Q5_K for IQ4 methods only without an
    importance matrix (llama_tensor_get_type: `!has_imatrix`)."""
    from fasttune.export.gguf_types import tensor_type

    def kind(method, imatrix, layer=0):
        return tensor_type(f"blk.{layer}.ffn_down.weight", (256, 512), method, arch="llama", n_layer=16, n_head=8,
                           n_head_kv=8, tied=False, imatrix=imatrix)

    assert kind("iq4_xs", False) == kind("iq4_nl", False) == "Q5_K" and kind("iq4_xs", False, layer=2) == "IQ4_XS"
    assert kind("iq4_xs", True) == "IQ4_XS" and kind("iq4_nl", True) == "IQ4_NL"
    assert kind("q4_k_s", True) == "Q5_K"  # the k-quants' rule does not look at the imatrix


def test_gguf_name_cannot_mislead_llama_cpp():
    from types import SimpleNamespace

    from fasttune.export.gguf import gguf_model_name

    name = lambda path, mt="llama": gguf_model_name(SimpleNamespace(name_or_path=path,  # noqa: E731
                                                                    arch=SimpleNamespace(model_type=mt)))
    assert name("/tmp/phi3-finetune") == "finetune"
    assert name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert name("Qwen/Qwen2.5-0.5B", "qwen2") == "Qwen2.5-0.5B"
    assert name("/x/my model (v2)/") == "my-model-v2"
    assert name(None) == name("/x/phi3") == "fasttune-model"


def test_cli_k_quant_export_loads_in_llama_cpp(model_dir, tmp_path, capsys):
    """fasttune export --quantization q4_k_m,q8_0: two files, k-quant types inside, both load and run in llama.cpp
    close to our logits."""
    from bpe_tokenizers import make_bpe_tokenizer

    from fasttune import FastLanguageModel
    from fasttune.cli import main

    folder = model_dir("llama", **SIZES)
    out = tmp_path / "out"
    assert main(["export", "--model", str(folder), "--format", "gguf", "--quantization", "Q4_K_M,q8_0",
                 "--output", str(out)]) == 0
    paths = [out / "model.Q4_K_M.gguf", out / "model.Q8_0.gguf"]
    printed = capsys.readouterr().out
    assert all(str(p) in printed for p in paths), printed
    types = {k: v[0] for k, v in _tensors(paths[0]).items()}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    reader = gguf.GGUFReader(paths[0])
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert reader.fields["general.name"].contents() == "llama"
    ids = make_bpe_tokenizer("gpt2")("The quick brown fox jumps over the lazy dog.")["input_ids"]
    model, _ = FastLanguageModel.from_pretrained(str(folder))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    for path, limit in zip(paths, (0.15, 0.05)):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)])
        llm.close()
        assert np.abs(theirs - ours).max() / (ours.max() - ours.min()) < limit, path


def test_qwen3_5_moe_mixtures_equal_llama_quantize(model_dir, tmp_path):
    """Qwen3.5-MoE ("qwen35moe", widths 256): DeltaNet tensors, routed experts, the shared expert and its (1, H) gate
    (F32, as ggml counts it 1-D) have llama_model_quantize's types and bytes for q8_0, q4_k_m, q3_k_m and q6_k."""
    methods = ["q8_0", "q4_k_m", "q3_k_m", "q6_k"]
    f32, ours = _export(model_dir("qwen3_5_moe_text", hidden_size=256, head_dim=64, moe_intermediate_size=256,
                                  shared_expert_intermediate_size=256), tmp_path, methods)
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        assert types["blk.0.ffn_gate_inp_shexp.weight"] == types["blk.0.ssm_conv1d.weight"] == "F32"


@pytest.mark.parametrize("family, sizes", [
    ("glm4_moe", dict(hidden_size=256, intermediate_size=256, head_dim=64, moe_intermediate_size=256,
                      n_routed_experts=4)),
    ("qwen3_next", dict(hidden_size=256, head_dim=64, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                        mlp_only_layers=[])),
    ("lfm2", dict(hidden_size=256, intermediate_size=768, block_multiple_of=256, head_dim=64)),
    ("glm4_moe_lite", dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, n_routed_experts=4,
                           q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64,
                           v_head_dim=128)),
])
def test_newer_families_mixtures_equal_llama_quantize(family, sizes, model_dir, tmp_path):
    """GLM-4.5 ("glm4moe": a dense first layer, experts, shared experts, the routing bias), Qwen3-Next ("qwen3next":
    fused DeltaNet projections), LFM2 ("lfm2": short convolutions) and GLM-4.7-Flash ("deepseek2": the latent
    attention's attn_k_b / attn_v_b): q4_k_m has llama_model_quantize's types and bytes for every tensor."""
    methods = ["q4_k_m"]
    f32, ours = _export(model_dir(family, **sizes), tmp_path, methods)
    for method, path in ours.items():
        types = _compare(path, llama_quantize(f32, tmp_path / f"llama.{method}.gguf", method))
        small = {"glm4_moe": "blk.1.exp_probs_b.bias", "qwen3_next": "blk.0.ssm_conv1d.weight",
                 "lfm2": "blk.0.shortconv.conv.weight", "glm4_moe_lite": "blk.1.exp_probs_b.bias"}[family]
        assert types[small] == "F32"
