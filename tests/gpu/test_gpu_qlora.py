"""GPU checks for NF4 (skipped without CUDA): our quantiser against bitsandbytes' CUDA kernels, and an NF4 QLoRA
model in bf16 against transformers + PEFT + bitsandbytes on the same bnb-4bit checkpoint."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.quant.nf4 import dequantize_nf4_reference, quantize_nf4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
bnb = pytest.importorskip("bitsandbytes")


def test_quantise_on_cuda_matches_bitsandbytes_cuda():
    import bitsandbytes.functional as F

    w = (torch.randn(4096, 1024, device="cuda") * 0.02).bfloat16()
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.nested_absmax, qs.state2.absmax)
    mismatch = (ours.absmax != qs.absmax).float().mean().item()
    assert mismatch < 0.01, mismatch  # near-ties of the 8-bit absmax codes only
    deq = dequantize_nf4_reference(ours, torch.bfloat16)
    theirs = F.dequantize_4bit(packed, qs)
    assert (deq.float() - theirs.float()).abs().max() <= 0.02 * w.float().abs().max()


def test_bf16_qlora_logits_and_grads_close_to_transformers_bnb(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    folder = tmp_path / "bnb4"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), quantization_config=qc, device_map="cuda",
                                         dtype=torch.bfloat16).save_pretrained(folder)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.bfloat16, device="cuda")
    ours = FastLanguageModel.get_peft_model(ours, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    randomize_lora_b(ours)  # B = 0 would make every lora_A gradient zero
    ours.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cuda", dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True).train()
    ids = torch.randint(3, 300, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    a = ours(ids, labels=ids)
    b = ref(input_ids=ids, labels=ids)
    assert abs(a.loss.item() - b.loss.item()) < 2e-2 * b.loss.item()
    a.loss.backward()
    b.loss.backward()
    ga = ours.model.layers[0].self_attn.q_proj.lora_A.grad.float()
    gb = dict(ref.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    gb = gb.grad.float()
    assert gb.norm() > 0 and (ga - gb).norm() / gb.norm() < 5e-2
