"""The real SmolLM2-135M-Instruct (the embedded GGUF's weights, fp32) in q4_k_m: our export against llama.cpp's
llama_model_quantize of our own f32 file, every tensor's type and bytes (issue #19). SmolLM2's hidden size 576
does not divide into 256-blocks, so most of its tensors take llama.cpp's fallbacks (Q4_K -> Q5_0, Q6_K -> Q8_0 for
attn_*, ffn_gate/up and the tied embedding); only ffn_down (rows of 1536) is Q4_K/Q6_K."""
import ctypes
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _tensors(path):
    import gguf

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_smollm2_q4_k_m_equals_llama_quantize(smollm2_loaded, tmp_path):
    """All 272 tensors (no subset; about 18 s on 2 idle cores): the same type as llama-quantize chooses, byte for byte."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = smollm2_loaded  # shared by the session: save_pretrained_gguf only reads it
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    f32, ours = model.save_pretrained_gguf(tmp_path / "smol.gguf", tok, quantization_method=["f32", "q4_k_m"],
                                           progress=False, modelfile=False)
    assert sum(float(p.double().sum()) for p in model.parameters()) == checksum
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count()
    theirs = tmp_path / "llama.Q4_K_M.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    types = {k: (a[k][0], b[k][0]) for k in a if a[k][0] != b[k][0]}
    assert not types, f"types differ (ours, llama.cpp): {types}"
    differ = [k for k in a if a[k][1] != b[k][1]]
    assert not differ, f"bytes differ in {len(differ)} of {len(a)} tensors: {differ[:10]}"
    kinds = {k: v[0] for k, v in a.items()}
    assert kinds["blk.0.attn_q.weight"] == "Q5_0" and kinds["blk.0.ffn_down.weight"] == "Q6_K"
    assert kinds["blk.3.ffn_down.weight"] == "Q4_K" and kinds["token_embd.weight"] == "Q8_0"
