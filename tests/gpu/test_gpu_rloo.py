"""GPU check (skipped without CUDA) of RLOO: sampled bf16 steps on the card with the KL penalty (beta 0.05: the
sampling policy's and the reference's log-probs at every step) train the tiny Llama, and the leave-one-out
advantages and the loss of a scored batch equal the CPU's fp32 computation of the same completions."""
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROWS = [{"prompt": "add: 1+1", "answer": "ab"}, {"prompt": "x", "answer": "b"}]


def distinct_characters(completions, **_):
    return [float(len(set(c))) for c in completions]


def _trainer(folder, tmp_path, device, dtype, **cfg):
    from fasttune import FastLanguageModel, RLOOConfig, RLOOTrainer

    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=dtype, device=device)
    args = RLOOConfig(output_dir=str(tmp_path / device), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=12, logging_steps=1, save_strategy="no", shuffle=False,
                      bf16=dtype == "bfloat16", **cfg)
    return RLOOTrainer(model, reward_funcs=[distinct_characters], processing_class=tok, train_dataset=ROWS,
                       args=args)


def test_sampled_bf16_steps(tiny_model_dir, tmp_path):
    from fasttune import FastLanguageModel

    folder = tiny_model_dir("llama")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype="float32", device="cpu")
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8).save_pretrained(tmp_path / "adapter")
    trainer = _trainer(tmp_path / "adapter", tmp_path, "cuda", "bfloat16", max_steps=3, learning_rate=1e-3)
    trainer.train()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in logs)
    assert all("kl" in h and math.isfinite(h["kl"]) for h in logs)


def test_scored_batch_equals_the_cpu(tiny_model_dir, tmp_path):
    """The same adapter and completions scored on the card in fp32 and on the CPU: advantages (with the KL penalty)
    and the loss agree."""
    from fasttune import FastLanguageModel
    from peft_oracle import randomize_lora_b

    folder = tiny_model_dir("llama")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype="float32", device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    model.save_pretrained(tmp_path / "start")
    randomize_lora_b(model)  # the policy away from the reference (the fresh adapter)
    model.save_pretrained(tmp_path / "moved")
    torch.backends.cuda.matmul.allow_tf32 = False
    completions = [[97, 98, 256], [97, 256], [98, 98, 98, 97, 256], [99, 100, 101, 102, 103],
                   [98, 256], [97, 98, 256], [98, 256], [120, 121, 256]]
    out = {}
    for device in ("cpu", "cuda"):
        trainer = _trainer(tmp_path / "start", tmp_path, device, "float32")
        moved, _ = FastLanguageModel.from_pretrained(str(tmp_path / "moved"), dtype="float32", device=device)
        with torch.no_grad():  # the policy's weights become the moved adapter's; the reference stays the start
            own = dict(trainer.model.named_parameters())
            for n, p in moved.named_parameters():
                if "lora_" in n:
                    own[n].copy_(p)
        batch = trainer.score(trainer.train_examples[:8], completions, [256 not in c for c in completions], [8])[0]
        loss, _ = trainer.micro_batch_loss(trainer.to_device(batch), trainer.count_items(batch))
        out[device] = (batch["advantages"].cpu(), float(loss))
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-4, atol=1e-5)
    assert out["cuda"][0].abs().sum() > 0
    assert out["cuda"][1] == pytest.approx(out["cpu"][1], rel=1e-4, abs=1e-6)
