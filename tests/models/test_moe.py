"""Sparse MoE (Qwen3-MoE, Mixtral): grouped expert GEMMs (with and without LoRA) against the loop, routing and the
load-balancing loss against transformers, logits, LoRA gradients (attention, experts, router) and short loss curves
against transformers(+PEFT), merged and adapter round trips."""
import contextlib

import pytest
import torch
from peft_oracle import peft_grads, peft_twin, randomize_lora_b, reference_sft_losses
from tiny import MOE_FAMILIES, hf_model

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError
from fasttune.kernels.dispatch import use_triton
from fasttune.kernels.grouped_lora import expert_lora_linear
from fasttune.models.moe import experts_forward, experts_reference, load_balancing_loss, route
from fasttune.peft.adapter_io import adapter_parameters
from fasttune.peft.lora import ExpertLora, set_adapters_enabled


def _batch(pad=True):
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 8:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("method", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_grouped_experts_equal_the_loop_forward_and_backward(monkeypatch, kernels, method, act):
    """Also through the Triton permute/unpermute and packed activation (the interpreter on a CPU)."""
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    torch.manual_seed(0)
    n, h, i, e, k = 37, 64, 32, 5, 2
    x = torch.randn(n, h, requires_grad=True)
    gate_up = (torch.randn(e, 2 * i, h) * 0.1).requires_grad_()
    down = (torch.randn(e, h, i) * 0.1).requires_grad_()
    weights, experts = route(torch.randn(n, e), k, norm_topk_prob=True)
    experts = experts.masked_fill(experts == 3, 4)  # expert 3 gets no token: an empty group
    weights = weights.requires_grad_()
    grad = torch.randn(n, h)
    leaves = (x, weights, gate_up, down)
    ref = experts_reference(x, weights, experts, gate_up, down, act)
    want = torch.autograd.grad(ref, leaves, grad)
    out = experts_forward(x, weights, experts, gate_up, down, act, method=method)
    got = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, w, name in zip(got, want, ("x", "weights", "gate_up_proj", "down_proj")):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    assert got[2][3].abs().max() == 0  # the empty expert gets no gradient


@pytest.mark.parametrize("method,kernels", [("grouped_mm", "torch"), ("padded_bmm", "torch"),
                                            ("grouped_mm", "triton"), ("padded_bmm", "triton")])
def test_grouped_expert_lora_equals_the_loop_on_merged_weights(monkeypatch, method, kernels):
    """LoRA on both stacked weights as grouped GEMMs on the sorted tokens equals PEFT's formulation (each expert's
    weight W_e + s * B_e @ A_e, PEFT's ParamWrapper layout), run through the loop: outputs and the gradients of x,
    the routing weights and the four LoRA tensors. With our kernels, both projections take the fused
    expert_lora_linear (the rank-r products added in place)."""
    if kernels == "triton":
        pytest.importorskip("triton")
    from fasttune.models import moe

    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    fused = []
    monkeypatch.setattr(moe, "EAGER_FUSED_MIN_WORK", 0)  # the fused path at a tiny size (see test_moe's policy test)
    monkeypatch.setattr(moe, "expert_lora_linear", lambda *a, **k: fused.append(1) or expert_lora_linear(*a, **k))
    torch.manual_seed(0)
    n, h, i, e, k, r = 29, 64, 32, 5, 2, 4
    x = torch.randn(n, h, requires_grad=True)
    gate_up, down = torch.randn(e, 2 * i, h) * 0.1, torch.randn(e, h, i) * 0.1
    weights, experts = route(torch.randn(n, e), k, norm_topk_prob=True)
    experts = experts.masked_fill(experts == 3, 4)  # an empty group
    weights = weights.requires_grad_()
    adapters = {"gate_up_proj": ExpertLora(gate_up, r, 0.5), "down_proj": ExpertLora(down, 2 * r, 2.0)}
    for a in adapters.values():
        a.reset_parameters()
        torch.nn.init.normal_(a.lora_B, std=0.1)
    leaves = (x, weights, *(p for a in adapters.values() for p in (a.lora_A, a.lora_B)))
    grad = torch.randn(n, h)
    ref = experts_reference(x, weights, experts, gate_up + adapters["gate_up_proj"].delta_weight(),
                            down + adapters["down_proj"].delta_weight(), "silu")
    want = torch.autograd.grad(ref, leaves, grad)
    out = experts_forward(x, weights, experts, gate_up, down, "silu", method=method,
                          lora={name: a.factors(x.dtype) for name, a in adapters.items()})
    got = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, w, name in zip(got, want, ("x", "weights", "gate_up A", "gate_up B", "down A", "down B")):
        # the two sides sum in different orders: to 1e-6 of each tensor's largest entry
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item(), msg=name)
    assert len(fused) == (2 if use_triton(x) else 0)  # a GPU machine runs these CPU tensors on torch's path


def test_fused_expert_lora_only_where_its_launches_pay(monkeypatch):
    """Eager steps take the fused expert LoRA only from EAGER_FUSED_MIN_WORK up (measured: Qwen3-30B-A3B's
    projections are host-bound with it, gpt-oss-20b's gain); a step that a CUDA graph captures or warms up for
    (replayed_launches) takes it at any size; both paths give the same result."""
    pytest.importorskip("triton")
    from fasttune.kernels.dispatch import replayed_launches
    from fasttune.models import moe

    def pays(rows, k_in, n_out):
        return moe._fused_pays(torch.empty(rows, k_in, device="meta"), (None, torch.empty(1, 4, n_out, device="meta")))

    tokens = 2 * 2048
    assert not pays(tokens * 8, 2048, 2 * 768) and not pays(tokens * 8, 768, 2048)  # Qwen3-30B-A3B, top-8
    assert pays(tokens * 4, 2880, 2 * 2880) and pays(tokens * 4, 2880, 2880)  # gpt-oss-20b, top-4
    with replayed_launches():
        assert pays(1, 1, 1)

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    fused = []
    monkeypatch.setattr(moe, "expert_lora_linear", lambda *a, **k: fused.append(1) or expert_lora_linear(*a, **k))
    torch.manual_seed(1)
    n, h, i, e = 9, 32, 16, 3
    x = torch.randn(n, h)
    gate_up, down = torch.randn(e, 2 * i, h) * 0.1, torch.randn(e, h, i) * 0.1
    weights, experts = route(torch.randn(n, e), 2, norm_topk_prob=True)
    adapters = {"gate_up_proj": ExpertLora(gate_up, 2, 0.5), "down_proj": ExpertLora(down, 2, 2.0)}
    for a in adapters.values():
        a.reset_parameters()
        torch.nn.init.normal_(a.lora_B, std=0.1)
    outs, counts = [], []
    for replayed in (False, True):
        fused.clear()
        with replayed_launches() if replayed else contextlib.nullcontext():
            outs.append(experts_forward(x, weights, experts, gate_up, down, "silu", method="grouped_mm",
                                        lora={name: a.factors(x.dtype) for name, a in adapters.items()}))
        counts.append(len(fused))
    assert counts == [0, 2]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,norm", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
def test_routing_equals_transformers_router(family, norm):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from tiny import hf_config

    cfg = hf_config(family, norm_topk_prob=norm)
    router = (MixtralTopKRouter if family == "mixtral" else Qwen3MoeTopKRouter)(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, 64)
    logits, weights, experts = router(x)
    ours_w, ours_e = route(logits, cfg.num_experts_per_tok, norm)
    assert torch.equal(ours_e, experts)
    torch.testing.assert_close(ours_w, weights.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(1)
    logits = tuple(torch.randn(2 * 6, 4) for _ in range(3))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]) if masked else None
    want = load_balancing_loss_func(logits, 4, 2, mask)
    torch.testing.assert_close(load_balancing_loss(list(logits), 4, 2, mask), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("experts_impl", ["eager", "grouped_mm"])
def test_logits_equal_transformers(family, experts_impl, tiny_model_dir):
    folder = tiny_model_dir(family)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    ref = hf_model(family)
    ref.set_experts_implementation(experts_impl) if hasattr(ref, "set_experts_implementation") else None
    assert [layer.is_moe for layer in ours.model.layers] == ([False, True] if family == "qwen3_moe" else [True, True])
    ids, mask, _ = _batch()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_qwen3_moe_sparse_step_and_dense_layers(tiny_model_dir):
    """decoder_sparse_step=2 with no mlp_only_layers: layer 1 is sparse, layer 0 dense (transformers' rule)."""
    folder = tiny_model_dir("qwen3_moe", mlp_only_layers=[], decoder_sparse_step=2)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    assert [layer.is_moe for layer in ours.model.layers] == [False, True]
    ref = hf_model("qwen3_moe", mlp_only_layers=[], decoder_sparse_step=2)
    ids, _, _ = _batch(pad=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,kernels", [(f, "torch") for f in MOE_FAMILIES] + [("qwen3_moe", "triton")])
def test_aux_loss_and_lora_grads_equal_peft(monkeypatch, family, kernels, tiny_model_dir, tmp_path):
    """output_router_logits: loss = CE + router_aux_loss_coef * aux as transformers computes it (padding masked).
    Default targets (the MLP names adapt the experts: gate_up_proj at rank 2r as PEFT maps them) plus the router
    by target_parameters: the adapter loads in transformers + PEFT with the same keys, and loss and every LoRA
    gradient equal PEFT's, the aux term included; disabled adapters give the base model's logits. (PEFT warns that
    the gate_up_proj rank / alpha patterns match no module: its check looks at modules only; the shapes show they
    apply.) With our kernels (the Triton interpreter on a CPU) the experts' LoRA takes the fused path."""
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    monkeypatch.setattr("fasttune.models.moe.EAGER_FUSED_MIN_WORK", 0)  # the fused path at a tiny size
    folder = tiny_model_dir(family, output_router_logits=True, router_aux_loss_coef=0.3)
    ours, _ = FastLanguageModel.from_pretrained(str(folder))
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                            target_parameters=["mlp.gate.weight"])
    settings = ours.lora_settings
    assert settings.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    assert settings.rank_pattern == {r".*\.gate_up_proj": 8} and settings.alpha_pattern == {r".*\.gate_up_proj": 16}
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin(family, tmp_path / "adapter", output_router_logits=True, router_aux_loss_coef=0.3)
    ids, mask, labels = _batch()
    out = ours(ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss is not None and len(out.router_logits) == (1 if family == "qwen3_moe" else 2)
    torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    want.loss.backward()
    theirs = peft_grads(ref)
    mine = {k.removeprefix("base_model.model.").removesuffix(".weight"): p.grad
            for k, p in adapter_parameters(ours).items()}
    moe_layers = 1 if family == "qwen3_moe" else 2
    assert len(mine) == 2 * 4 * 2 + moe_layers * 3 * 2 and set(mine) == set(theirs)
    for n, g in mine.items():  # summation order differs (experts, aux): to 1e-5 of each tensor's largest entry
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-5 * theirs[n].abs().max().item(), msg=n)
    set_adapters_enabled(ours, False)
    with torch.no_grad(), ref.disable_adapter():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_recompute_keeps_the_aux_loss_gradient(tiny_model_dir):
    """Per-layer recompute (use_gradient_checkpointing=True) back-propagates the router logits too."""
    folder = tiny_model_dir("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    grads = []
    for mode in (False, True):
        model, _ = FastLanguageModel.from_pretrained(str(folder))
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"],
                                                 use_gradient_checkpointing=mode)
        randomize_lora_b(model)
        model.train()
        ids, mask, labels = _batch()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.model.gradient_checkpointing is True
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8, msg=n)


def _rows(n=16):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return [{"text": " ".join(words[(i + j) % 6] for j in range(2 + (i * 7) % 9))} for i in range(n)]


@pytest.mark.parametrize("family,targets", [
    ("qwen3_moe", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("mixtral", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    # LoRA on the experts (rank r, PEFT's target_parameters) and the router ("gate"), recompute on
    ("qwen3_moe", dict(target_modules=["q_proj", "v_proj", "gate"],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
])
def test_loss_curve_equals_transformers_peft(family, targets, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    experts = "target_parameters" in targets
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=experts,
                                             **targets)
    model.save_pretrained(tmp_path / "init")
    steps = 20  # optimizer steps, gradient accumulation 2 on both sides
    # (the reference loop adds no load-balancing loss: turned off here; tests/train/test_router_aux_loss.py has it)
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=5e-3, lr_scheduler_type="constant", max_steps=steps, max_grad_norm=1.0,
                     router_aux_loss_coef=0.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    batches = trainer.step_batches(0, 0)
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]
    theirs = reference_sft_losses(peft_twin(family, tmp_path / "init").train(), batches, steps, lr=5e-3)
    assert len(ours) == steps and ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=0)


def test_merged_export_loads_in_transformers_and_back(tiny_model_dir, tmp_path):
    """With LoRA on attention, experts and router, the merged checkpoint holds transformers 5's stacked layout
    (experts.gate_up_proj / down_proj, mlp.gate) with each weight = base + delta as PEFT's merge_and_unload forms it;
    transformers loads it with our logits and our loader takes it as it is; the adapter reloads into fasttune with
    the same settings and logits."""
    from transformers import AutoModelForCausalLM

    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("mixtral")), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                            target_modules="all-linear")
    assert ours.lora_settings.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj",
                                                    "mlp.gate.weight"]
    randomize_lora_b(ours)
    ours.eval()
    ids, _, _ = _batch(pad=False)
    with torch.no_grad():
        want = ours(ids).logits
        ours.save_pretrained(tmp_path / "adapter")
        ours.save_pretrained_merged(tmp_path / "merged", None, save_method="merged_16bit")
        merged = peft_twin("mixtral", tmp_path / "adapter").merge_and_unload().state_dict()
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                     "model.layers.1.mlp.gate.weight", "model.layers.1.self_attn.q_proj.weight"):
            torch.testing.assert_close(hf.state_dict()[name], merged[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-5, atol=1e-5)
        for folder in ("merged", "adapter"):
            back, _ = FastLanguageModel.from_pretrained(str(tmp_path / folder), dtype=torch.float32)
            torch.testing.assert_close(back.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)
    saved = ours.lora_settings.to_dict()
    assert saved.pop("requested_target_modules") == "all-linear"
    assert back.lora_settings.to_dict() == saved  # the adapter's config holds the applied targets


def test_single_expert_parameter_keys_load_in_peft(tiny_model_dir, tmp_path):
    """One adapted parameter per experts module: PEFT keys it without the base_layer level; rank r, no pattern."""
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, target_modules=["o_proj"],
                                            target_parameters=["mlp.experts.down_proj"])
    randomize_lora_b(ours)
    keys = [k for k in adapter_parameters(ours) if ".mlp." in k]
    assert keys == ["base_model.model.model.layers.1.mlp.experts.lora_A.weight",
                    "base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    assert adapter_parameters(ours)[keys[0]].shape == (4 * 4, 32) and not ours.lora_settings.rank_pattern
    ours.save_pretrained(tmp_path / "adapter")
    ids, _, _ = _batch(pad=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, peft_twin("qwen3_moe", tmp_path / "adapter")(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_adapter_written_by_peft_loads_into_fasttune(tiny_model_dir, tmp_path):
    """PEFT's own adapter for the default names plus the router (its converted config: suffix target_parameters,
    rank / alpha patterns) loads onto our model with transformers+PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    from fasttune.peft.adapter_io import load_adapter_into

    ref = get_peft_model(hf_model("qwen3_moe"), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate"]))
    randomize_lora_b(ref)
    ref.save_pretrained(tmp_path / "adapter")
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), dtype=torch.float32)
    settings = load_adapter_into(ours, tmp_path / "adapter")
    assert settings.rank_pattern == {r".*\.gate_up_proj": 8} and len(settings.target_parameters) == 3
    ids, _, _ = _batch(pad=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, ref.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_expert_lora_settings_are_refused(tiny_model_dir):
    qwen, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")))
    with pytest.raises(ConfigError, match="list of layer names"):
        FastLanguageModel.get_peft_model(qwen, r=4, target_modules=r".*\.q_proj")
    with pytest.raises(ConfigError, match="'gate_proj' without 'up_proj'"):
        FastLanguageModel.get_peft_model(qwen, r=4, target_modules=["q_proj", "gate_proj", "down_proj"])
    with pytest.raises(ConfigError, match="lora_dropout=0.1 with LoRA on the MoE experts"):
        FastLanguageModel.get_peft_model(qwen, r=4, lora_dropout=0.1)
    with pytest.raises(ConfigError, match="selects 'model.layers.0.self_attn.q_proj.weight'"):
        FastLanguageModel.get_peft_model(qwen, r=4, target_modules=["o_proj"],
                                         target_parameters=["self_attn.q_proj.weight"])
    with pytest.raises(ConfigError, match="use_dora=True with LoRA on the MoE experts"):
        FastLanguageModel.get_peft_model(qwen, r=4, use_dora=True, target_parameters=["mlp.experts.down_proj"])
    dense, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    with pytest.raises(ConfigError, match="no mixture-of-experts layers"):
        FastLanguageModel.get_peft_model(dense, r=4, target_parameters=["mlp.experts.gate_up_proj"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_greedy_generation_equals_transformers(family, tiny_model_dir):
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    ref = hf_model(family)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    a = ours.eval().generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
