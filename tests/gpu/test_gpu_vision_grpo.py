"""GPU check (skipped without CUDA) of GRPO on prompts with images: the tiny Qwen2.5-VL run of
tests/train/objectives/test_grpo_vision.py on the card, in fp32 with our kernels, gives TRL 1.16's per-step loss, kl
and grad-norm (tests/fixtures/vision_grpo_trl.json); and real sampling in bf16 (the KV-cache decode with images in
the prompt, left-padded) trains Qwen2.5-VL and Gemma 3 without ever sampling an image placeholder."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "vision_grpo_trl.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train" / "objectives"))


def _on_card(folder, tmp_path, dtype):
    """The starting adapter as the CPU run draws it (a seeded draw on the card takes the card's random numbers),
    loaded on the card."""
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    FastVisionModel.get_peft_model(model, r=4, lora_alpha=8).save_pretrained(tmp_path / "init", tokenizer=proc)
    model, proc = FastVisionModel.from_pretrained(str(tmp_path / "init"), dtype=dtype, device="cuda")
    model.gradient_checkpointing = False
    return model, proc


def test_vision_grpo_on_the_card_equals_trl(qwen_vl_dir, tmp_path):
    from test_grpo_vision import _fixed

    torch.backends.cuda.matmul.allow_tf32 = False
    model, proc = _on_card(qwen_vl_dir, tmp_path, torch.float32)
    trainer = _fixed(model, proc, tmp_path)
    trainer.train()
    ours = [h for h in trainer.log_history if "loss" in h]
    for mine, theirs in zip(ours, json.loads(ORACLE.read_text())["qwen2_5_vl"], strict=True):
        for key in ("loss", "kl", "grad_norm", "reward"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), key


def distinct_characters(completions, **_):
    """Differs within a group of random completions, so the advantages and the grad-norm are not zero."""
    return [float(len(set(c[0]["content"]))) for c in completions]


@pytest.mark.parametrize("folder", ["qwen_vl_dir", "gemma3_vl_dir"])
def test_sampled_bf16_steps(folder, request, tmp_path):
    from test_grpo_vision import _config, _rows

    from fasttune import GRPOTrainer

    model, proc = _on_card(request.getfixturevalue(folder), tmp_path, torch.bfloat16)
    seen = []

    class Recording(GRPOTrainer):
        def sample(self, examples, seed):
            out = super().sample(examples, seed)
            seen.extend(out[0])
            return out

    trainer = Recording(model, reward_funcs=[distinct_characters], processing_class=proc, train_dataset=_rows(),
                        args=_config(tmp_path, max_steps=2, max_completion_length=16, temperature=1.0, bf16=True))
    trainer.train()
    logs = [h for h in trainer.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in logs)
    placeholders = {model.image_token_id, model.video_token_id} - {None}
    assert len(seen) == 16 and not placeholders & {t for c in seen for t in c}
