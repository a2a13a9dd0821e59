"""GPU check (skipped without CUDA) of DPO on preference pairs with images: the tiny Qwen2.5-VL run of
tests/train/objectives/test_dpo_vision.py on the card, in fp32 with our kernels, gives TRL 1.16's losses
(tests/fixtures/vision_dpo_trl.json)."""
import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "vision_dpo_trl.json"


def test_vision_dpo_on_the_card_equals_trl(qwen_vl_dir, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train" / "objectives"))
    from test_dpo_vision import BETA, LR, STEPS, _rows

    from fasttune import DPOConfig, DPOTrainer, FastVisionModel

    torch.backends.cuda.matmul.allow_tf32 = False
    # the starting adapter as the CPU run draws it (a seeded draw on the card takes the card's random numbers)
    model, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir), dtype=torch.float32, device="cpu")
    FastVisionModel.get_peft_model(model, r=4, lora_alpha=8).save_pretrained(tmp_path / "init", tokenizer=proc)
    model, proc = FastVisionModel.from_pretrained(str(tmp_path / "init"), dtype=torch.float32, device="cuda")
    model.gradient_checkpointing = False
    trainer = DPOTrainer(model=model, processing_class=proc, train_dataset=_rows(4),
                         args=DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                        gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=LR, beta=BETA,
                                        logging_steps=1, shuffle=False))
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]
    trl = json.loads(ORACLE.read_text())["qwen2_5_vl_losses"]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(trl), rtol=1e-3, atol=1e-4)
