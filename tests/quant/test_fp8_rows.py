"""load_in_fp8: FP8 weights with row scales (quant/fp8_rows.py), multiplied in FP8 (kernels/fp8.py).

The oracle is transformers + PEFT on the same tiny model with each decoder Linear holding the dequantised FP8
weight and, through public module hooks, seeing its input rounded per row to FP8 and its output gradient rounded
as ours is (g x row scales of the weight, per row): the FP8 recipe written out on the reference's modules."""
import json

import pytest
import torch
from peft_oracle import check_recompute_gradients, peft_grads, peft_twin, randomize_lora_b
from tiny import lora_losses

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError
from fasttune.kernels.fp8 import FP8, quantize_rows_reference
from fasttune.quant.fp8_rows import dequantize_fp8_rows, quantize_fp8_rows, state_to_tensors
from fasttune.quant.linear import QuantLinear


def test_state_rounds_rows_and_keeps_its_storage_through_model_casts():
    w = torch.randn(6, 32)
    w[3] = 0
    st = quantize_fp8_rows(w)
    assert st.weight.dtype == FP8 and st.scale.shape == (6,) and st.nbytes() == 6 * 32 + 6 * 4
    assert torch.equal(st.scale, w.abs().amax(1).clamp(min=1e-12) / 448)
    err = (dequantize_fp8_rows(st, torch.float32) - w).abs()
    assert (err <= 16 * st.scale.unsqueeze(1)).all() and (dequantize_fp8_rows(st)[3] == 0).all()
    t = state_to_tensors(st, "m.")
    assert t["m.weight"].dtype == FP8 and t["m.weight_scale"].shape == (6, 1)
    layer = QuantLinear.from_linear(torch.nn.Linear(32, 6, bias=True), "fp8")
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == FP8 and layer.weight_scale.dtype == torch.float32
    assert layer.compute_dtype == torch.bfloat16 and set(layer.state_dict()) == {"weight", "weight_scale", "bias"}


def _fp8_reference_hooks(model):
    """Each decoder nn.Linear of transformers' `model` (not lm_head) gets its FP8-dequantised weight and hooks that
    round its input per row (straight through for the gradient) and its output gradient as kernels/fp8.py does."""
    def round_input(module, args):
        x = args[0]
        q, s = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
        return (x + ((q.float() * s).view(x.shape).to(x.dtype) - x).detach(),)

    def round_grad(module, grads):
        g = grads[0]
        ws = module.fp8_row_scale
        q, s = quantize_rows_reference(g.reshape(-1, g.shape[-1]), ws)
        return (((q.float() * s) / ws).view(g.shape).to(g.dtype),)

    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and "lm_head" not in name and ".lora_" not in name:
            st = quantize_fp8_rows(m.weight.data)
            m.weight.data = dequantize_fp8_rows(st, m.weight.dtype)
            m.fp8_row_scale = st.scale
            m.register_forward_pre_hook(round_input)
            m.register_full_backward_pre_hook(round_grad)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_logits_and_lora_gradients_equal_the_fp8_recipe_on_transformers_peft(family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_fp8=True, dtype=torch.float32)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 2 * 7 and all(m.quant_type == "fp8" for m in model.modules() if isinstance(m, QuantLinear))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    ref = peft_twin(family, tmp_path / "adapter")
    _fp8_reference_hooks(ref.base_model.model)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    ours = model(ids, labels=ids)
    theirs = ref(input_ids=ids, labels=ids)
    ours.loss.backward()
    theirs.loss.backward()
    ref_grads = peft_grads(ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = n.removesuffix(".weight")
            torch.testing.assert_close(p.grad, ref_grads[key], rtol=1e-4, atol=1e-6, msg=n)
    # and close to the unquantised model: FP8's precision, not another model
    plain, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        exact = plain(ids, labels=ids).loss
    assert abs(ours.loss.item() - exact.item()) < 0.02 * exact.item()


def test_training_merging_and_reloading(tiny_model_dir, tmp_path):
    """A few LoRA steps lower the loss; the adapter reloads over FP8 weights (load_in_fp8 with the adapter folder);
    merged_16bit holds the dequantised weights plus the update and transformers loads it."""
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_fp8=True,
                                                   dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = lora_losses(model, ids, steps=6)
    assert losses[-1] < losses[0] - 0.1
    model.save_pretrained(tmp_path / "adapter")
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_fp8=True, dtype=torch.float32)
    assert again.model.layers[1].mlp.up_proj.base_layer.quant_type == "fp8"
    model.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        model.save_pretrained_merged(tmp_path / "merged", tok)
        cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert "quantization_config" not in cfg
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        layer = model.model.layers[0].self_attn.q_proj
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight,
                                   layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight(),
                                   rtol=1e-6, atol=1e-6)
        gap = (merged(input_ids=ids).logits - model(ids).logits).abs().max()
        assert gap < 0.05 * model(ids).logits.abs().max()  # only the activations' rounding differs


@pytest.mark.parametrize("kw, match", [
    (dict(load_in_fp8="block"), "block scales is not implemented"),
    (dict(load_in_fp8=True, load_in_4bit=True), "load_in_4bit and load_in_fp8 are all set"),
    (dict(load_in_fp8=True, full_finetuning=True), "drop load_in_fp8"),
    (dict(load_in_fp8=True, load_in_16bit=True), "give one"),
])
def test_bad_fp8_options(kw, match, tiny_model_dir):
    with pytest.raises(ConfigError, match=match):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), **kw)


def test_transformers_fallback_refuses_fp8(tiny_model_dir):
    with pytest.raises(ConfigError, match="load_in_fp8 / --quantization fp8 is not supported"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_fp8=True, fast=False)


def test_every_recompute_mode_gives_the_same_gradients(tiny_model_dir):
    """Layer recompute and "offload" (kept attention, down_proj's skipped base GEMM) re-run the FP8 products on the
    same inputs: the gradients of no recompute."""
    check_recompute_gradients(tiny_model_dir("llama"), load_in_fp8=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "gemma3_text", "deepseek_v3", "qwen3_5_text", "lfm2"])
def test_other_layouts_train_in_fp8(family, tiny_model_dir):
    """Mixture-of-experts models keep their stacked experts in FP8 too (row scales, multiplied in 16 bits; gpt-oss's
    stacks are stored (E, in, out)); Gemma 3's, latent attention's (DeepSeek-V3), gated DeltaNet's (Qwen3.5) and short
    convolutions' (LFM2) projections take FP8 as Llama's do. The loss is close to the 16-bit model's and has LoRA
    gradients, and greedy generation runs."""
    from fasttune.quant.experts import QuantExpertWeight

    folder = str(tiny_model_dir(family))
    model, _ = FastLanguageModel.from_pretrained(folder, load_in_fp8=True, dtype=torch.float32)
    assert {m.quant_type for m in model.modules() if isinstance(m, QuantLinear)} == {"fp8"}
    stacks = [m for m in model.modules() if isinstance(m, QuantExpertWeight)]
    assert all(m.quant_type == "fp8" for m in stacks) and bool(stacks) == (family in ("qwen3_moe", "gpt_oss",
                                                                                      "deepseek_v3"))
    plain, _ = FastLanguageModel.from_pretrained(folder, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    loss = model(ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        assert abs(loss.item() - plain(ids, labels=ids).loss.item()) < 0.02 * loss.item()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and "lora_B" in n)  # (A gets none while B is zero)
    model.eval()
    assert model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_fp8_expert_stacks_are_their_rows_dequantised(tiny_model_dir, tmp_path):
    """An FP8 expert stack computes as the 16-bit model whose stack holds its dequantised rows: logits and expert
    LoRA gradients equal (the storage and dequantisation are the only change); the stack's bytes are a quarter of
    fp32's plus the scales; merged exports hold the dequantised values."""
    from fasttune.quant.experts import QuantExpertWeight

    folder = str(tiny_model_dir("qwen3_moe"))
    fp8, _ = FastLanguageModel.from_pretrained(folder, load_in_fp8=True, dtype=torch.float32)
    ref, _ = FastLanguageModel.from_pretrained(folder, load_in_fp8=True, dtype=torch.float32)
    for name, module in list(ref.named_modules()):
        if isinstance(module, QuantExpertWeight):
            owner, _, attr = name.rpartition(".")
            parent = ref.get_submodule(owner)
            delattr(parent, attr)
            parent.register_parameter(attr, torch.nn.Parameter(module.dequantized(torch.float32),
                                                               requires_grad=False))
    stack = fp8.model.layers[1].mlp.experts.gate_up_proj  # (layer 0 is dense)
    rows = stack.qweight.float() * stack.scale.unsqueeze(-1)
    assert torch.equal(stack.dequantized(torch.float32), rows)
    assert stack.nbytes() == rows.numel() + stack.scale.numel() * 4
    grads = []
    for model in (fp8, ref):
        lora = FastLanguageModel.get_peft_model(model, r=4, target_parameters=["mlp.experts.gate_up_proj"],
                                                target_modules=["q_proj"], random_state=0)
        randomize_lora_b(lora)
        ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(4))
        out = lora(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in lora.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and any("experts" in n for n in grads[0][1])
    for n, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][n], rtol=1e-5, atol=1e-7, msg=n)
    from fasttune.export.merged import merged_state_dict

    merged = merged_state_dict(fp8, torch.float32)
    assert merged["model.layers.1.mlp.experts.gate_up_proj"].shape == stack.shape


def test_vision_language_model_keeps_its_tower_16_bit(qwen_vl_dir):
    model, _ = FastLanguageModel.from_pretrained(str(qwen_vl_dir), load_in_fp8=True, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert names and all(".layers." in n and "visual" not in n for n in names)
    assert {m.quant_type for m in model.modules() if isinstance(m, QuantLinear)} == {"fp8"}


def test_an_fp8_checkpoint_loads_into_row_scales(tmp_path, tiny_tokenizer):
    """A FineGrainedFP8 checkpoint (block scales) with load_in_fp8=True: its dequantised weights re-quantised per
    row; the logits stay within FP8's rounding of the checkpoint's dequantised model."""
    from fp8_checkpoint import to_fp8_checkpoint
    from tiny import hf_model, save_hf

    folder = to_fp8_checkpoint(save_hf(hf_model("llama"), tmp_path / "m", tiny_tokenizer), tmp_path / "fp8",
                               block=(16, 32))
    plain, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    fp8, _ = FastLanguageModel.from_pretrained(str(folder), load_in_fp8=True, dtype=torch.float32)
    layer = fp8.model.layers[0].mlp.up_proj
    assert layer.quant_type == "fp8"
    want = quantize_fp8_rows(plain.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(layer.qweight.view(torch.uint8), want.weight.view(torch.uint8))
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = fp8(ids).logits, plain(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()



def test_fp8_expert_stack_in_chunks_equals_one_pass(monkeypatch):
    """Stacks larger than a chunk are quantised and dequantised a few experts at a time: the same values as in one
    pass."""
    import fasttune.quant.experts as experts

    w = torch.randn(5, 12, 16)
    whole = experts.QuantExpertWeight.quantize(w, "fp8")
    monkeypatch.setattr(experts, "_FP8_CHUNK_ELEMENTS", 2 * 12 * 16)  # two experts a chunk: chunks of 2, 2, 1
    parts = experts.QuantExpertWeight.quantize(w, "fp8")
    assert torch.equal(parts.qweight.view(torch.uint8), whole.qweight.view(torch.uint8))
    assert torch.equal(parts.scale, whole.scale)
    assert torch.equal(parts.dequantized(torch.float32), whole.dequantized(torch.float32))
    q, s = quantize_rows_reference(w.reshape(-1, 16))
    assert torch.equal(whole.dequantized(torch.float32), (q.float() * s).view(5, 12, 16))
