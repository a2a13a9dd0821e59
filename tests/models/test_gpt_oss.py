"""gpt-oss on our decoder: attention sinks, YaRN RoPE, the biased clamped-SwiGLU experts and top-k router, MXFP4
checkpoints, against transformers' GptOssForCausalLM (+ PEFT): logits with left padding past the sliding window,
LoRA gradients (attention and experts, aux loss on), a short loss curve, greedy generation, merged export.
One tiny checkpoint (hidden 64, head_dim 64, 4 experts top-2, layers sliding (window 4) / full) serves the module."""
import json

import pytest
import torch
from peft_oracle import peft_grads, peft_twin, randomize_lora_b, reference_sft_losses
from tiny import hf_config, hf_model, save_hf

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError
from fasttune.kernels.rope import rope_attention_factor, rope_inv_freq
from fasttune.models.config import ModelConfig
from fasttune.models.attention import attention_with_sinks, attention_with_sinks_reference
from fasttune.models.gpt_oss import (clamped_swiglu, gpt_oss_experts_forward, gpt_oss_experts_reference,
                                     route_top_logits)
from fasttune.peft.adapter_io import adapter_parameters
from fasttune.peft.lora import ExpertLora, set_adapters_enabled
from fasttune.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_tokenizer import make_tiny_tokenizer

    return save_hf(hf_model("gpt_oss"), tmp_path_factory.mktemp("gpt_oss"), make_tiny_tokenizer())


@pytest.fixture(scope="module")
def ref():
    return hf_model("gpt_oss")


def _batch(left_pad=True):
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if left_pad:
        mask[1, :3] = 0
        # a padding position's prediction of the first real token is no target (no collator makes it one; our
        # decoder lets a padding query see itself, transformers' sees only the sink)
        labels[1, :4] = -100
    return ids, mask, labels


def test_clamped_swiglu_and_router_equal_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    cfg = hf_config("gpt_oss")
    gate_up = torch.randn(50, 64) * 6  # beyond the clamp limit 7 on both sides
    torch.testing.assert_close(clamped_swiglu(gate_up, 7.0, 1.702), GptOssExperts(cfg)._apply_gate(gate_up),
                               rtol=0, atol=0)
    router = GptOssTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.bias)
    logits, scores, experts = router(torch.randn(20, 64))
    weights, ours = route_top_logits(logits, 2)
    assert torch.equal(ours, experts)
    torch.testing.assert_close(weights, scores, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method,kernels,bias_grad", [("grouped_mm", "torch", True), ("padded_bmm", "torch", True),
                                                     ("grouped_mm", "triton", True), ("grouped_mm", "triton", False)])
def test_experts_equal_the_loop_with_lora(monkeypatch, method, kernels, bias_grad):
    """Grouped GEMMs + per-expert biases + LoRA factors equal the loop over experts on W + delta (PEFT's
    ParamWrapper merge for transposed experts): outputs and gradients of x, routing weights, biases, LoRA. With our
    kernels and frozen biases (LoRA training) both projections take the fused expert_lora_linear, biases folded in;
    trained biases keep torch's path."""
    if kernels == "triton":  # the permute/unpermute kernels (the interpreter on a CPU)
        pytest.importorskip("triton")
    from fasttune.kernels.dispatch import use_triton
    from fasttune.kernels.grouped_lora import expert_lora_linear
    from fasttune.models import moe

    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    fused = []
    monkeypatch.setattr(moe, "EAGER_FUSED_MIN_WORK", 0)  # the fused path at a tiny size (see test_moe's policy test)
    monkeypatch.setattr(moe, "expert_lora_linear", lambda *a, **k: fused.append(1) or expert_lora_linear(*a, **k))
    torch.manual_seed(0)
    n, h, i, e, k, r = 29, 64, 32, 5, 2, 4
    x = torch.randn(n, h, requires_grad=True)
    gate_up, down = torch.randn(e, h, 2 * i) * 0.8, torch.randn(e, i, h) * 0.1
    gu_bias, d_bias = (torch.randn(e, 2 * i) * 0.5).requires_grad_(bias_grad), \
        (torch.randn(e, h) * 0.5).requires_grad_(bias_grad)
    weights, experts = route_top_logits(torch.randn(n, e), k)
    experts = experts.masked_fill(experts == 3, 4)  # an empty group
    weights = weights.requires_grad_()
    adapters = {"gate_up_proj": ExpertLora(gate_up, r, 0.5, transposed=True),
                "down_proj": ExpertLora(down, 2 * r, 2.0, transposed=True)}
    for a in adapters.values():
        a.reset_parameters()
        torch.nn.init.normal_(a.lora_B, std=0.1)
    assert adapters["gate_up_proj"].lora_A.shape == (e * r, h) and adapters["gate_up_proj"].lora_B.shape == (2 * i, r * e)
    leaves = (x, weights, *((gu_bias, d_bias) if bias_grad else ()),
              *(p for a in adapters.values() for p in (a.lora_A, a.lora_B)))
    grad = torch.randn(n, h)
    ref = gpt_oss_experts_reference(x, weights, experts, gate_up + adapters["gate_up_proj"].delta_weight(), gu_bias,
                                    down + adapters["down_proj"].delta_weight(), d_bias, 7.0, 1.702)
    want = torch.autograd.grad(ref, leaves, grad)
    out = gpt_oss_experts_forward(x, weights, experts, gate_up, gu_bias, down, d_bias, 7.0, 1.702, method=method,
                                  lora={name: a.factors(x.dtype) for name, a in adapters.items()})
    got = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = ("x", "weights", *(("gu bias", "d bias") if bias_grad else ()), "gu A", "gu B", "d A", "d B")
    for g, w, name in zip(got, want, names):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=name)
    assert len(fused) == (2 if use_triton(x) and not bias_grad else 0)  # a GPU machine: torch's path on a CPU


@pytest.mark.parametrize("params", [
    dict(factor=8.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=32),
    dict(factor=32.0, original_max_position_embeddings=4096),  # truncate defaults to True
    dict(factor=4.0, mscale=0.707, mscale_all_dim=1.0, original_max_position_embeddings=64),
])
def test_yarn_rope_equals_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config("gpt_oss", rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **params})
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours = ModelConfig.from_hf(cfg)
    torch.testing.assert_close(rope_inv_freq(64, ours.rope_theta, ours.rope_scaling), want, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours.rope_scaling) == pytest.approx(factor, rel=1e-12) and factor != 1.0


@pytest.mark.parametrize("mask_kind", ["causal", "window", "decode"])
def test_attention_sinks_through_sdpa_equal_eager(mask_kind):
    """The sink as an extra key through SDPA equals transformers' eager formulation, forward and backward (GQA)."""
    torch.manual_seed(0)
    t = 1 if mask_kind == "decode" else 9
    q = torch.randn(2, 4, t, 64, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True)
    pos = torch.arange(9)
    mask = None
    if mask_kind == "window":
        mask = ((pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] < 4))[None, None].expand(2, 1, 9, 9)
    elif mask_kind == "decode":  # the decode step's additive float mask (B, 1, 1, S): row 0 has 2 padded slots
        mask = torch.zeros(2, 1, 1, 9).index_fill_(-1, torch.tensor([0, 1]), float("-inf"))
        mask[1] = 0
    bool_mask = mask if mask is None or mask.dtype == torch.bool else mask == 0
    out = attention_with_sinks(q, k, v, mask, 0.125, sinks)
    ref = attention_with_sinks_reference(q, k, v, bool_mask, 0.125, sinks)
    grad = torch.randn_like(ref)
    for g, w in zip(torch.autograd.grad(out, (q, k, v, sinks), grad), torch.autograd.grad(ref, (q, k, v, sinks), grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts_impl", ["eager", "grouped_mm"])
def test_logits_equal_transformers(folder, ref, experts_impl):
    """Left padding, 12 tokens over a window of 4: logits (and the aux loss) equal GptOssForCausalLM's."""
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    assert ours.arch.sliding_windows == [4, None] and ours.arch.attn_sinks and ours.arch.rope_scaling["rope_type"] == "yarn"
    ref.set_experts_implementation(experts_impl)
    ids, mask, _ = _batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_router_logits=True)
        b = ref(input_ids=ids, attention_mask=mask, output_router_logits=True)
    m = mask.bool()
    torch.testing.assert_close(a.logits[m], b.logits[m], rtol=1e-5, atol=1e-5 * b.logits.abs().max().item())
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=0)


def test_mxfp4_checkpoint_dequantises_on_load(folder, ref, tmp_path):
    """Experts packed to MXFP4 (blocks / scales as OpenAI's checkpoints store them, quantization_config mxfp4)
    load as the representable values: equal to transformers' own unpacking, logits equal transformers' model with
    those weights; the loaded config drops quantization_config, so a save writes plain weights."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(folder / "model.safetensors")
    packed, representable = {}, {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t)
            representable[name] = dequantize_mxfp4(blocks, scales)
            torch.testing.assert_close(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32),
                                       representable[name], rtol=0, atol=0)
            assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(representable[name])), representable[name])
            assert (representable[name] - t).abs().max() < 0.25 * t.abs().max()  # close, not equal: FP4
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        else:
            packed[name] = t
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    save_file(packed, mx / "model.safetensors", metadata={"format": "pt"})
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (mx / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                     "model.layers.*.mlp.router"]}
    (mx / "config.json").write_text(json.dumps(cfg))
    ours, _ = FastLanguageModel.from_pretrained(str(mx), dtype=torch.float32)
    assert getattr(ours.config, "quantization_config", None) is None
    for name, t in representable.items():
        assert torch.equal(ours.state_dict()[name], t), name
    twin = hf_model("gpt_oss")
    twin.load_state_dict(representable, strict=False)
    ids, _, _ = _batch(left_pad=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_lora_grads_and_aux_loss_equal_peft(monkeypatch, kernels, folder, tmp_path):
    """Default targets: attention, and the MLP names map onto the stacked experts (gate_up_proj at rank 2r, as on
    the other MoE families); PEFT builds the same model from the adapter (target_parameters on GptOssExperts,
    which it reads transposed). Loss (aux term included) and every LoRA gradient equal PEFT's; disabled adapters
    give the base model's logits. With our kernels (the Triton interpreter on a CPU) the experts' LoRA takes the
    fused path, the biases and the clamped SwiGLU included."""
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    monkeypatch.setattr("fasttune.models.moe.EAGER_FUSED_MIN_WORK", 0)  # the fused path at a tiny size
    ours, _ = FastLanguageModel.from_pretrained(str(folder))
    ours.config.output_router_logits, ours.config.router_aux_loss_coef = True, 0.3
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin("gpt_oss", tmp_path / "adapter", output_router_logits=True, router_aux_loss_coef=0.3)
    ids, mask, labels = _batch()
    out = ours(ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    want.loss.backward()
    theirs = peft_grads(ref)
    mine = {k.removeprefix("base_model.model.").removesuffix(".weight"): p.grad
            for k, p in adapter_parameters(ours).items()}
    assert len(mine) == 2 * 4 * 2 + 2 * 2 * 2 and set(mine) == set(theirs)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-5 * theirs[n].abs().max().item(), msg=n)
    set_adapters_enabled(ours, False)
    with torch.no_grad(), ref.disable_adapter():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_loss_curve_equals_transformers_peft(folder, tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"text": " ".join(words[(i + j) % 6] for j in range(2 + (i * 7) % 9))} for i in range(8)]
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True,
                                             target_modules=["q_proj", "v_proj", "o_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model.save_pretrained(tmp_path / "init")
    steps = 20  # optimizer steps, gradient accumulation 2 on both sides
    # (the reference loop adds no load-balancing loss: turned off, as tests/models/test_moe.py does)
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=5e-3, lr_scheduler_type="constant", max_steps=steps, max_grad_norm=1.0,
                     router_aux_loss_coef=0.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
    batches = trainer.step_batches(0, 0)
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]
    theirs = reference_sft_losses(peft_twin("gpt_oss", tmp_path / "init").train(), batches, steps, lr=5e-3)
    assert len(ours) == steps and ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=0)


def test_greedy_generation_equals_transformers(folder, ref):
    """Left-padded prompts, 8 new tokens: the prompt and the decode steps (additive float masks, sinks) run past
    the window of 4."""
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    a = ours.eval().generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_merged_export_loads_in_transformers(folder, tmp_path):
    """LoRA on attention and experts merged: the checkpoint keeps transformers' layout (experts (E, in, out),
    biases, sinks, router), its expert weights equal PEFT's merge_and_unload, transformers loads it with our
    logits."""
    from transformers import AutoModelForCausalLM

    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, target_modules="all-linear")
    randomize_lora_b(ours)
    ids, _, _ = _batch(left_pad=False)
    with torch.no_grad():
        want = ours.eval()(ids).logits
        ours.save_pretrained(tmp_path / "adapter")
        ours.save_pretrained_merged(tmp_path / "merged", None, save_method="merged_16bit")
        merged = peft_twin("gpt_oss", tmp_path / "adapter").merge_and_unload().state_dict()
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                     "model.layers.0.self_attn.q_proj.weight"):
            torch.testing.assert_close(hf.state_dict()[name], merged[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_router_lora_is_refused(folder):
    model, _ = FastLanguageModel.from_pretrained(str(folder))
    with pytest.raises(ConfigError, match="LoRA on gpt-oss's router"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], target_parameters=["mlp.router.weight"])
    with pytest.raises(ConfigError, match="match no layer"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "gate"])


def test_nf4_stacks_without_lora_save_no_dequantised_weight():
    """gpt-oss's (E, in, out) NF4 stacks without LoRA on them (attention-only QLoRA): the input gradient equals the
    dequantised stack's, and autograd keeps no 16-bit stack (it is dequantised again in backward)."""
    from fasttune.quant.experts import QuantExpertWeight

    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(4, 64, 64, generator=g) * 0.1, torch.randn(4, 32, 64, generator=g) * 0.1
    q_gate_up, q_down = QuantExpertWeight.quantize(gate_up), QuantExpertWeight.quantize(down)
    weights, experts = route_top_logits(torch.randn(10, 4, generator=g), 2)
    bias_gu, bias_d = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    x = torch.randn(10, 64, generator=g)
    grads, saved = [], []
    for stacks in ((q_gate_up, q_down), (q_gate_up.dequantized(torch.float32), q_down.dequantized(torch.float32))):
        xi = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = gpt_oss_experts_forward(xi, weights, experts, stacks[0], bias_gu, stacks[1], bias_d, 7.0, 1.702,
                                          method="padded_bmm")
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad))
        if not grads[1:]:
            assert torch.Size([4, 64, 64]) not in saved and torch.Size([4, 32, 64]) not in saved
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_load_in_4bit_quantizes_the_experts(folder):
    """load_in_4bit stores the (E, in, out) expert stacks in NF4 (quant/experts.py) and the block computes with
    their dequantised values; LoRA on them trains."""
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        got = block(x)[0]
        for attr in ("gate_up_proj", "down_proj"):
            holder = block.experts._modules.pop(attr)
            assert tuple(holder.shape) == ((4, 64, 64) if attr == "gate_up_proj" else (4, 32, 64))
            block.experts.register_parameter(attr, torch.nn.Parameter(holder.dequantized(torch.float32)))
        torch.testing.assert_close(got, block(x)[0], rtol=1e-6, atol=1e-6)
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    ids, mask, labels = _batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model).values())
