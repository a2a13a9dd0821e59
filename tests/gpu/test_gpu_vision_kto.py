"""GPU check (skipped without CUDA) of KTO on rows with images: the tiny Qwen2.5-VL run of
tests/train/objectives/test_kto_vision.py on the card, in fp32 with our kernels, gives TRL 1.16's per-step loss and
metrics (tests/fixtures/vision_kto_trl.json)."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "vision_kto_trl.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train" / "objectives"))


def test_vision_kto_on_the_card_equals_trl(qwen_vl_dir, tmp_path):
    from test_kto_vision import KEYS, _trainer

    from fasttune import FastVisionModel

    torch.backends.cuda.matmul.allow_tf32 = False
    # the starting adapter as the CPU run draws it (a seeded draw on the card takes the card's random numbers)
    model, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir), dtype=torch.float32, device="cpu")
    FastVisionModel.get_peft_model(model, r=4, lora_alpha=8).save_pretrained(tmp_path / "init", tokenizer=proc)
    model, proc = FastVisionModel.from_pretrained(str(tmp_path / "init"), dtype=torch.float32, device="cuda")
    model.gradient_checkpointing = False
    trainer = _trainer(model, proc, tmp_path)
    trainer.train()
    ours = [h for h in trainer.log_history if "loss" in h]
    for mine, theirs in zip(ours, json.loads(ORACLE.read_text())["qwen2_5_vl"], strict=True):
        for key in KEYS:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), key
