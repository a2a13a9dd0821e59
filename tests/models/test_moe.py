"""Sparse MoE (Qwen3-MoE, Mixtral): grouped expert GEMMs against the loop, routing and the load-balancing loss
against transformers, logits, LoRA gradients and a short loss curve against transformers(+PEFT)."""
import pytest
import torch
from peft_oracle import peft_grads, peft_twin, randomize_lora_b, reference_sft_losses
from tiny import MOE_FAMILIES, hf_model

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError
from fasttune.models.moe import experts_forward, experts_reference, load_balancing_loss, route


def _batch(pad=True):
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 8:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("method", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_grouped_experts_equal_the_loop_forward_and_backward(method, act):
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


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_aux_loss_and_lora_grads_equal_peft(family, tiny_model_dir, tmp_path):
    """output_router_logits: loss = CE + router_aux_loss_coef * aux as transformers computes it (padding masked);
    LoRA gradients (default targets: the MLP names are left out, so attention only) equal PEFT's, the aux term
    included."""
    folder = tiny_model_dir(family, output_router_logits=True, router_aux_loss_coef=0.3)
    ours, _ = FastLanguageModel.from_pretrained(str(folder))
    with pytest.warns(UserWarning, match="LoRA on this model's MoE experts is not supported yet"):
        ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
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
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(mine) == len(theirs) == 2 * 4 * 2
    assert ours.lora_settings.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    for n, g in mine.items():  # summation order differs (experts, aux): to 1e-5 of each tensor's largest entry
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-5 * theirs[n].abs().max().item(), msg=n)


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


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_loss_curve_equals_transformers_peft(family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.save_pretrained(tmp_path / "init")
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=5e-3, lr_scheduler_type="constant", max_steps=8, max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    batches = trainer.step_batches(0, 0)
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]
    theirs = reference_sft_losses(peft_twin(family, tmp_path / "init").train(), batches, 8, lr=5e-3)
    assert len(ours) == 8 and ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=0)


def test_gguf_export_refuses_moe(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("mixtral")))
    with pytest.raises(ConfigError, match="GGUF export supports the families"):
        model.save_pretrained_gguf(tmp_path / "m.gguf", tok, quantization_method="f16")
    assert not (tmp_path / "m.gguf").exists()


def test_merged_export_loads_in_transformers_and_back(tiny_model_dir, tmp_path):
    """The merged checkpoint holds transformers 5's stacked layout (experts.gate_up_proj / down_proj, mlp.gate),
    which transformers loads and our loader takes as it is; the adapter reloads too."""
    from transformers import AutoModelForCausalLM

    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("mixtral")), dtype=torch.float32)
    with pytest.warns(UserWarning, match="left out"):
        ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(ours)
    ours.eval()
    ids, _, _ = _batch(pad=False)
    with torch.no_grad():
        want = ours(ids).logits
        ours.save_pretrained(tmp_path / "adapter")
        ours.save_pretrained_merged(tmp_path / "merged", None, save_method="merged_16bit")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-5, atol=1e-5)
        for folder in ("merged", "adapter"):
            back, _ = FastLanguageModel.from_pretrained(str(tmp_path / folder), dtype=torch.float32)
            torch.testing.assert_close(back.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_string_or_expert_only_targets_are_refused(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")))
    with pytest.raises(ConfigError, match="list of attention"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
    with pytest.raises(ConfigError, match="target the attention projections"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["gate_proj", "down_proj"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_greedy_generation_equals_transformers(family, tiny_model_dir):
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), dtype=torch.float32)
    ref = hf_model(family)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    a = ours.eval().generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
