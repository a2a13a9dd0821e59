"""FP8 checkpoints (quant/fp8.py): dequantised on load as transformers dequantises them, in any tensor order, with
the config's quantization_config dropped; quantised checkpoints of methods fasttune does not read are refused before
anything loads (they used to load as wrong numbers with only a warning about unexpected tensors)."""
import json

import pytest
import torch
from fp8_checkpoint import quantize_fp8, to_compressed_tensors, to_fp8_checkpoint
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ModelLoadError
from fasttune.quant.fp8 import dequantize_fp8, fp8_tensors


@pytest.mark.parametrize("shape, block", [((64, 96), (16, 16)), ((70, 50), (16, 24)), ((3, 40, 56), (16, 16)),
                                          ((64, 96), None)], ids=["blocks", "ragged", "stacked", "per-tensor"])
def test_dequantize_equals_transformers(shape, block):
    """Each value times its block's scale (the last blocks cut short when the sizes are not multiples; stacked
    experts' scales per expert; one scale per tensor) as transformers' _dequantize_fp8_weight computes it."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8(w, block)
    got = dequantize_fp8(q, s, block, torch.float32)
    torch.testing.assert_close(got, _dequantize_fp8_weight(q, s, block, torch.float32), rtol=0, atol=0)
    assert (got - w).abs().max() <= 0.07 * w.abs().max()  # e4m3: 3 mantissa bits


def test_dequantize_refuses_scales_that_do_not_fit():
    q, s = quantize_fp8(torch.randn(32, 32), (16, 16))
    with pytest.raises(ModelLoadError, match=r"scales of shape \(2, 2\) do not fit .* blocks of 16 x 8"):
        dequantize_fp8(q, s, (16, 8), torch.float32)


def test_stream_pairs_weights_and_scales_in_any_order():
    """A weight before or after its scale (shards may split them), a stacked expert tensor with `_scale_inv`, and
    activation scales dropped; a weight whose scale never comes is an error naming it."""
    a, b = torch.randn(32, 32), torch.randn(4, 32, 16)
    qa, sa = quantize_fp8(a, (16, 16))
    qb, sb = quantize_fp8(b, (16, 16))
    stream = [("x.weight_scale_inv", sa), ("n.weight", torch.ones(3)), ("x.weight", qa), ("x.activation_scale",
                                                                                           torch.tensor(0.1)),
              ("e.gate_up_proj", qb), ("e.gate_up_proj_scale_inv", sb)]
    out = dict(fp8_tensors(iter(stream), torch.float32, (16, 16), "ckpt"))
    assert list(out) == ["n.weight", "x.weight", "e.gate_up_proj"]
    torch.testing.assert_close(out["x.weight"], dequantize_fp8(qa, sa, (16, 16), torch.float32))
    torch.testing.assert_close(out["e.gate_up_proj"], dequantize_fp8(qb, sb, (16, 16), torch.float32))
    with pytest.raises(ModelLoadError, match="ckpt: the FP8 tensor 'x.weight' has no partner .*x.weight_scale_inv"):
        list(fp8_tensors(iter(stream[2:3]), torch.float32, (16, 16), "ckpt"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_tokenizer):
    return save_hf(hf_model("llama"), tmp_path_factory.mktemp("plain") / "m", tiny_tokenizer)


@pytest.mark.parametrize("block, static", [((16, 32), False), (None, True)], ids=["blocks", "per-tensor-static"])
def test_fp8_checkpoint_loads_as_transformers_dequantises_it(block, static, plain, tmp_path):
    """Logits equal transformers' own load of the FP8 checkpoint (dequantised: this machine has no GPU), differ
    from the 16-bit original's by FP8's rounding only, and the merged save holds plain weights without the
    quantization_config."""
    from transformers import AutoModelForCausalLM

    folder = to_fp8_checkpoint(plain, tmp_path / "fp8", block=block, static=static)
    with _no_unexpected_tensors():
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert 0 < (ours - original).abs().max() < 0.1 * original.abs().max()
    model.save_pretrained_merged(tmp_path / "merged", save_method="merged_16bit")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_fp8_experts_load(tmp_path, tiny_tokenizer):
    """Per-expert FP8 weights (transformers 5's save layout of Qwen3-MoE) dequantise before they are stacked."""
    from transformers import AutoModelForCausalLM

    folder = to_fp8_checkpoint(save_hf(hf_model("qwen3_moe"), tmp_path / "m", tiny_tokenizer), tmp_path / "fp8")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        torch.testing.assert_close(model(ids).logits, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq"])
def test_other_quantised_checkpoints_are_refused_before_loading(method, plain, tmp_path):
    import shutil

    folder = tmp_path / method
    shutil.copytree(plain, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"quantised with '{method}'.*16-bit checkpoint.*fast=False"):
        FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)


def test_fp8_vision_language_checkpoint_loads_dequantised(tmp_path):
    """Mistral 3 with its language model in FP8 (the tower in 16 bits, as such releases keep it): transformers
    dequantises it on load for us, and the logits on an image batch equal its own."""
    from tiny_vision import save_mistral3, solid_image
    from transformers import AutoModelForImageTextToText

    from fasttune import FastVisionModel

    folder = to_fp8_checkpoint(save_mistral3(tmp_path / "m"), tmp_path / "fp8",
                               chosen=lambda n: "language_model.layers." in n and n.endswith("proj.weight"))
    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}])
    batch = proc(text=[text], images=[solid_image("red", (48, 64))])
    with torch.no_grad():
        theirs = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()(**batch).logits
        torch.testing.assert_close(model(**batch).logits, theirs, rtol=1e-5, atol=1e-5)


class _no_unexpected_tensors:
    """Fails the block if the loader warns about tensors it has no place for (a scale left over)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.seen = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.seen if "unexpected tensor" in str(w.message)]


def test_fp8_checkpoint_loads_in_4bit(plain, tmp_path):
    """load_in_4bit=True on an FP8 checkpoint: each weight dequantised, then quantised to NF4 as a 16-bit one is."""
    from fasttune.quant.linear import QuantLinear

    folder = to_fp8_checkpoint(plain, tmp_path / "fp8", block=(16, 32))
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, load_in_4bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    dense, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(ids).logits, dense(ids).logits
    assert (a - b).abs().max() < 0.15 * b.abs().max()


def test_compressed_tensors_fp8_loads_with_its_scales(plain, tmp_path):
    """compressed-tensors' FP8 ("float-quantized", per-channel scales stored as themselves): logits equal
    transformers' on the plain checkpoint of the same values (each float8 row times its scale); another
    compressed-tensors format (int4 "pack-quantized") is refused by name."""
    from transformers import AutoModelForCausalLM

    folder, reference = to_compressed_tensors(plain, tmp_path / "ct")
    with _no_unexpected_tensors():
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="compressed-tensors checkpoint \\(format 'pack-quantized'\\)"):
        FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
