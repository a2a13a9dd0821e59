"""GPU check (skipped without CUDA) of on-policy distillation: the chunked divergence on bf16 CUDA tensors against
fp64 formulas of the same values, and sampled bf16 DistillationTrainer steps on the card (a wider teacher) that train
the tiny Llama with a finite, falling divergence."""
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_on_bf16(beta):
    from fasttune.kernels.distill_divergence import token_divergence

    g = torch.Generator(device="cuda").manual_seed(0)
    hs = torch.randn(300, 128, device="cuda", generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(4000, 128, device="cuda", generator=g) / 8).bfloat16()
    ht = torch.randn(300, 192, device="cuda", generator=g).bfloat16()
    wt = (torch.randn(4000, 192, device="cuda", generator=g) / 8).bfloat16()
    h64 = hs.detach().double().requires_grad_()
    lps = (h64 @ ws.double().t()).log_softmax(-1)
    lpt = (ht.double() @ wt.double().t()).log_softmax(-1)
    ps, pt = lps.exp(), lpt.exp()
    m = ((1 - beta) * ps + beta * pt).log()
    want = {0.0: (pt * (lpt - lps)).sum(-1), 1.0: (ps * (lps - lpt)).sum(-1)}.get(
        beta, beta * (pt * (lpt - m)).sum(-1) + (1 - beta) * (ps * (lps - m)).sum(-1))
    (gh,) = torch.autograd.grad(want.sum(), h64)
    got, ent = token_divergence(hs, ws, ht, wt, beta, chunk_tokens=128)
    # (bf16 logits: each logit is rounded to bf16 first, as a bf16 nn.Linear rounds it)
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(ent.double(), -(ps * lps).sum(-1), rtol=1e-2, atol=1e-2)
    (h2,) = torch.autograd.grad(got.sum(), hs)
    torch.testing.assert_close(h2.double(), gh, rtol=5e-2, atol=5e-3)


def test_sampled_bf16_steps(tiny_model_dir, tmp_path, tiny_tokenizer):
    from tiny import hf_model, save_hf

    from fasttune import DistillationConfig, DistillationTrainer, FastLanguageModel

    teacher = save_hf(hf_model("llama", seed=3, hidden_size=96), tmp_path / "teacher", tiny_tokenizer)
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype="bfloat16", device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    args = DistillationConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=8, max_completion_length=12,
                              max_steps=6, learning_rate=5e-3, beta=0.5, bf16=True, logging_steps=1, shuffle=False,
                              save_strategy="no")
    trainer = DistillationTrainer(model, str(teacher), args=args, processing_class=tok,
                                  train_dataset=[{"prompt": f"{i} plus {i}"} for i in range(48)])
    assert trainer.teacher.dtype == torch.bfloat16 and trainer.teacher.device.type == "cuda"
    trainer.train()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 6 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in logs)
    assert sum(h["loss"] for h in logs[-2:]) < sum(h["loss"] for h in logs[:2])
