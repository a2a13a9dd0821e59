"""Per-expert importance matrices for mixture-of-experts GGUF exports (export/imatrix.py): collection equals the
statistic computed from each expert's routed tokens with its merged (LoRA) weights, for Qwen3-MoE and gpt-oss;
the quantized expert stacks equal ggml_quantize_chunk of each expert's rows with that expert's weights; the GGUF
imatrix file keeps the per-expert entries."""
import numpy as np

import pytest
import torch
from llama_cpp_check import ggml_lib, ggml_quantize

from fasttune import FastLanguageModel
from fasttune.export.imatrix import collect_imatrix, expert_imatrix_targets, load_imatrix, save_imatrix

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")


def _lora(model):
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)  # attention and experts
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model


def _expected(model, ids):
    """Per experts module: (counts (E,), sum x^2 (E, H), sum h^2 (E, I)) over `ids` in one chunk, from the tokens
    the module received and its stacked weights plus ExpertLora.delta_weight(), computed here independently."""
    from fasttune.kernels.activations import gated_act_reference
    from fasttune.kernels.clamped_swiglu import clamped_swiglu_reference

    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[m].register_forward_pre_hook(lambda mod, args, m=m: seen.__setitem__(m, args))
             for m in expert_imatrix_targets(model)]
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    out = {}
    for m, (x, _, experts) in seen.items():
        mod = modules[m]
        gu = mod.gate_up_proj.float() + (mod.lora["gate_up_proj"].delta_weight() if "gate_up_proj" in mod.lora else 0)
        transposed = getattr(mod, "is_transposed", False)
        counts, x2, h2 = [], [], []
        for e in range(gu.shape[0]):
            xe = x.float()[(experts == e).any(-1)]
            if transposed:
                h = clamped_swiglu_reference(xe @ gu[e] + mod.gate_up_proj_bias[e], mod.limit, mod.alpha)
            else:
                h = gated_act_reference(*(xe @ gu[e].t()).chunk(2, -1), mod.act)
            counts.append(xe.shape[0])
            x2.append(xe.square().sum(0).double())
            h2.append(h.square().sum(0).double())
        out[m] = torch.tensor(counts, dtype=torch.float64), torch.stack(x2), torch.stack(h2)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_collect_per_expert_statistics(family, tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    model = _lora(model)
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    im = collect_imatrix(model, ids, chunk_tokens=40, progress=False)
    targets = expert_imatrix_targets(model)
    assert targets and all(n.startswith("blk.") for names in targets.values() for n in names)
    for m, (counts, x2, h2) in _expected(model, ids).items():
        gate, up, down = targets[m]
        k = model.arch.num_experts_per_tok
        assert torch.equal(im.counts[gate], counts) and float(counts.sum()) == 40 * k
        torch.testing.assert_close(im.sums[gate], x2, rtol=1e-5, atol=1e-6)
        assert torch.equal(im.sums[up], im.sums[gate])  # gate and up read the same input
        torch.testing.assert_close(im.sums[down], h2, rtol=1e-4, atol=1e-6)


def test_gguf_expert_stacks_weighted_per_expert(tmp_path):
    """q4_k_m of a Qwen3-MoE (rows of 256: K types apply) with our per-expert imatrix: every expert stack's bytes
    equal ggml_quantize_chunk of each expert's rows with that expert's weights (an expert no token reached: weights
    1, as llama-quantize sets them), and the file round trip keeps the entries."""
    from bpe_tokenizers import make_bpe_tokenizer
    from tiny import hf_model, save_hf

    folder = save_hf(hf_model("qwen3_moe", vocab_size=416, hidden_size=256, intermediate_size=512,
                              moe_intermediate_size=256, head_dim=64, mlp_only_layers=[]), tmp_path / "moe",
                     make_bpe_tokenizer("gpt2"))
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    model = _lora(model)
    ids = torch.randint(3, 400, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    im = collect_imatrix(model, ids, chunk_tokens=32, progress=False)
    down = "blk.1.ffn_down_exps.weight"
    assert im.sums["blk.0.ffn_gate_exps.weight"].shape == (4, 256)
    im.counts[down] = im.counts[down].clone()
    im.counts[down][1] = 0  # as if expert 1 had seen nothing
    path = save_imatrix(im, tmp_path / "imatrix.gguf")
    back = load_imatrix(path)
    assert back.sums[down].shape == (4, 256) and torch.equal(back.counts[down], im.counts[down])
    assert torch.equal(back.weights(down)[1], torch.ones(256))
    f32, q = model.save_pretrained_gguf(tmp_path / "out", tok, quantization_method=["f32", "q4_k_m"],
                                        imatrix=str(path), progress=False, modelfile=False)
    ref = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(f32).tensors}
    lib = ggml_lib()
    checked = 0
    for t in gguf.GGUFReader(q).tensors:
        if "_exps" not in t.name:
            continue
        w = back.weights(t.name)
        assert w is not None and w.shape == (4, ref[t.name].shape[-1])
        theirs = np.stack([ggml_quantize(lib, ref[t.name][e], t.tensor_type.name, w[e].numpy()) for e in range(4)])
        assert np.asarray(t.data).tobytes() == theirs.tobytes(), t.name
        checked += 1
    assert checked == 6  # 2 layers x gate, up, down
