"""DoRA (peft/dora.py) against PEFT's LoraConfig(use_dora=True) on tiny models: a fresh adapter leaves the base
logits unchanged; logits and the gradients of A, B and the magnitude equal PEFT's for the same weights; adapters
round-trip both ways with PEFT's keys; a 20-step loss curve with gradient accumulation equals transformers+PEFT's;
merged exports equal PEFT's merge_and_unload; dropout follows PEFT's formula; NF4 bases and bad settings."""
import pytest
import torch
import torch.nn.functional as F
from peft_oracle import peft_grads, peft_twin, reference_sft_losses

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError
from fasttune.peft.adapter_io import adapter_parameters, load_adapter_into
from fasttune.peft.dora import DoraLinear

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _dora(folder, randomize=True, **kw):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                             use_gradient_checkpointing=False, **kw)
    if randomize:  # trained-looking B and magnitudes, so every gradient is non-trivial
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                elif "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model, tok


def test_fresh_dora_equals_base(tiny_model_dir):
    model, _ = _dora(tiny_model_dir("llama"), randomize=False)
    base, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    assert sum(isinstance(m, DoraLinear) for m in model.modules()) == 2 * len(TARGETS)
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, base.eval()(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases (subtracted before the DoRA scale)
def test_logits_and_grads_equal_peft(family, tiny_model_dir, tmp_path):
    ours, _ = _dora(tiny_model_dir(family))
    ours.save_pretrained(tmp_path / "adapter")
    ref = peft_twin(family, tmp_path / "adapter")
    assert ref.peft_config["default"].use_dora
    ids, mask, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(input_ids=ids, attention_mask=mask).logits[mask.bool()], rtol=1e-5, atol=1e-5)
    out = ours(ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=0)
    out.loss.backward()
    want.loss.backward()
    theirs = peft_grads(ref)
    mine = {k.removeprefix("base_model.model."): p.grad for k, p in adapter_parameters(ours).items()}
    mine = {k.removesuffix(".weight"): g for k, g in mine.items()}
    assert set(mine) == set(theirs) and len(mine) == 3 * 2 * len(TARGETS)
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], rtol=1e-5, atol=1e-6 * theirs[n].abs().max().item(), msg=n)


def test_adapter_written_by_peft_loads(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny import hf_model

    ref = get_peft_model(hf_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "adapter")
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    settings = load_adapter_into(ours, tmp_path / "adapter")
    assert settings.use_dora
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids, attention_mask=mask).logits[mask.bool()],
                                   ref.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()], rtol=1e-5,
                                   atol=1e-5)


def test_loss_curve_equals_transformers_peft(tiny_model_dir, tmp_path):
    model, tok = _dora(tiny_model_dir("llama"), randomize=False)
    model.save_pretrained(tmp_path / "init")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"text": " ".join(words[(i + j) % 6] for j in range(2 + (i * 7) % 9))} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=5e-3, lr_scheduler_type="constant", max_steps=20, max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
    batches = trainer.step_batches(0, 0)
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]
    theirs = reference_sft_losses(peft_twin("llama", tmp_path / "init").train(), batches, 20, lr=5e-3)
    assert len(ours) == 20 and ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=0)


def test_merged_export_equals_peft_merge(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    ours, tok = _dora(tiny_model_dir("llama"))
    ours.save_pretrained(tmp_path / "adapter")
    ours.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    merged = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(f))
    want = peft_twin("llama", tmp_path / "adapter").merge_and_unload().state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(merged[name].float(), want[name].float(), rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_follows_peft_formula(tiny_model_dir):
    """In training with dropout, the base product is taken again on the dropped-out input (PEFT's DoRA path)."""
    model, _ = _dora(tiny_model_dir("llama"), lora_dropout=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    layer.train()
    torch.manual_seed(0)
    got = layer(x)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.3, training=True)
    w = layer.base_layer.weight
    scale = layer.lora_magnitude_vector / torch.linalg.norm(w + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    want = F.linear(x, w) + (scale - 1) * F.linear(dropped, w) + scale * layer.scaling * (
        dropped @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_nf4_base(tiny_model_dir):
    """On an NF4 base the norm is the dequantised weight's: a fresh adapter leaves the NF4 model's logits as they
    are, and training moves the magnitudes."""
    base, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=TARGETS, use_dora=True,
                                             use_gradient_checkpointing=False)
    ids, _, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, base.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, labels=labels).loss.backward()
    mags = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert mags and all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags)


def test_dora_on_experts_is_refused(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")))
    with pytest.raises(ConfigError, match="use_dora=True with LoRA on the MoE experts"):
        FastLanguageModel.get_peft_model(model, r=4, use_dora=True)  # the default targets adapt the experts
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")))
    FastLanguageModel.get_peft_model(model, r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
