"""KTOTrainer on unpaired rows with images (tiny random Qwen2.5-VL and Gemma 3): rows laid out as TRL's vision KTO
collator lays them out, the policy, reference and KL-row log-probs equal to transformers + PEFT on the same rows and
images, and for Qwen2.5-VL three steps equal to TRL 1.16's own KTOTrainer (tests/fixtures/vision_kto_trl.json,
written by it where torchvision is installed); plus the data errors and the CLI."""
import json
from pathlib import Path

import pytest
import torch
from tiny_vision import oracle_inputs, solid_image

from fasttune.constants import IMAGE_KEYS
from fasttune.errors import DataError

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 210)}
STEPS, LR, BETA = 3, 2e-2, 0.1
SEED = 1  # a LoRA B draw whose KL rows come out above zero for both families
TRL_ORACLE = Path(__file__).resolve().parents[2] / "fixtures" / "vision_kto_trl.json"
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def _rows() -> list[dict]:
    """Four rows, two desirable and two not, images of two sizes placed by TRL's rule (string content)."""
    names = sorted(COLOURS)
    rows = []
    for i in range(4):
        shown = names[i % 3]
        said = shown if i % 2 == 0 else names[(i + 1) % 3]
        rows.append({"images": [solid_image(COLOURS[shown], (28 * (1 + i % 2), 56))],
                     "prompt": [{"role": "user", "content": "Colour?"}],
                     "completion": [{"role": "assistant", "content": said if i < 2 else f"It is {said}."}],
                     "label": i % 2 == 0})
    return rows


def _load(folder):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    return FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), proc


def _trainer(model, proc, tmp_path, rows=None, **kw):
    from fasttune import KTOConfig, KTOTrainer

    args = KTOConfig(**{"output_dir": str(tmp_path / "ours"), "per_device_train_batch_size": 4,
                        "gradient_accumulation_steps": 1, "max_steps": STEPS, "learning_rate": LR, "beta": BETA,
                        "logging_steps": 1, "shuffle": False, "save_strategy": "no", **kw})
    return KTOTrainer(model=model, processing_class=proc, train_dataset=rows or _rows(), args=args)


@pytest.fixture(params=["qwen_vl_dir", "gemma3_vl_dir", "idefics3_vl_dir", "internvl_vl_dir", "llava_vl_dir",
                        "mllama_vl_dir"])
def vl_folder(request):
    return request.getfixturevalue(request.param)


def test_log_probs_equal_transformers_and_peft(vl_folder, tmp_path):
    """A batch's rows are the processor's prompt followed by the completion's tokens; the policy, reference (the
    adapter as handed over: here the base) and KL-row (prompt i with completion i - 1, its own images) log-probs
    equal transformers + PEFT's on the same rows and images."""
    from peft import PeftModel
    from peft_oracle import randomize_lora_b
    from transformers import AutoModelForImageTextToText

    model, proc = _load(vl_folder)
    trainer = _trainer(model, proc, tmp_path)
    randomize_lora_b(model, seed=SEED)  # the policy away from the reference (the fresh adapter, i.e. the base)
    model.save_pretrained(tmp_path / "adapter")
    batch = trainer.collate_batch(trainer.train_examples[:4])
    rows = _rows()
    items = [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": items}], add_generation_prompt=True)
    prompt_ids = proc(text=[prompt], images=rows[0]["images"])["input_ids"][0].tolist()
    n = len(prompt_ids)
    assert batch["input_ids"][0, :n].tolist() == prompt_ids and batch["completion_mask"][0, :n].sum() == 0
    assert batch["completion_mask"][0, n:].sum() > 0 and batch["label"].tolist() == [True, False, True, False]

    twin = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vl_folder, dtype=torch.float32),
                                     str(tmp_path / "adapter")).eval()

    def summed(b):
        media = {**{k: b[k] for k in IMAGE_KEYS if k in b}, **oracle_inputs(vl_folder, b, proc)}
        logits = twin(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **media).logits
        # (the prompt's ids may lie past the vocabulary: Llama 3.2 Vision's <|image|>; masked out below)
        ids = b["input_ids"][:, 1:, None].clamp(max=logits.shape[-1] - 1)
        logps = logits[:, :-1].float().log_softmax(-1).gather(-1, ids).squeeze(-1)
        return (logps * b["completion_mask"][:, 1:]).sum(-1)

    with torch.no_grad():
        torch.testing.assert_close(trainer.logps(batch).sum(-1), summed(batch), rtol=1e-5, atol=1e-5)
        with twin.disable_adapter():
            torch.testing.assert_close(trainer.reference_logps(batch).sum(-1), summed(batch), rtol=1e-5, atol=1e-5)
    # The step's KL estimate: the mismatched rows, each prompt with its own images.
    trainer.prepare_step([batch], across_ranks=False)
    prompts = [[t for t, m, c in zip(*r) if m and not c] for r in zip(batch["input_ids"].tolist(),
               batch["attention_mask"].tolist(), batch["completion_mask"].tolist())]
    completions = [[t for t, c in zip(ids, m) if c] for ids, m in zip(batch["input_ids"].tolist(),
                   batch["completion_mask"].tolist())]
    from fasttune.data.preference import pad_sequences

    kl = pad_sequences(prompts, completions[-1:] + completions[:-1], proc.pad_id())
    kl.update({k: batch[k] for k in IMAGE_KEYS if k in batch})
    with torch.no_grad():
        policy = summed(kl)
        with twin.disable_adapter():
            ref = summed(kl)
    assert float((policy - ref).mean()) > 0  # (not clamped at 0: the comparison means something)
    assert trainer._kl == pytest.approx(float((policy - ref).mean()), rel=1e-4, abs=1e-6)


def test_steps_equal_trl(qwen_vl_dir, tmp_path):
    """Three steps (adapter starting at LoRA B zero, beta 0.1, AdamW at 2e-2, the four rows a step): loss, kl and
    the reward and log-prob metrics per step equal TRL 1.16's KTOTrainer's (see make_vision_kto_trl.py)."""
    model, proc = _load(qwen_vl_dir)
    trainer = _trainer(model, proc, tmp_path)
    trainer.train()
    ours = [h for h in trainer.log_history if "loss" in h]
    trl = json.loads(TRL_ORACLE.read_text())["qwen2_5_vl"]
    assert len(ours) == len(trl) == STEPS
    for mine, theirs in zip(ours, trl):
        for key in KEYS:
            assert mine[key] == pytest.approx(theirs[key], rel=2e-4, abs=1e-5), key
    assert ours[-1]["loss"] < ours[0]["loss"]


def test_paired_rows_and_errors(qwen_vl_dir, tmp_path):
    """Paired rows with images split into a desirable and an undesirable row; a label that is not a boolean, images
    in a completion and missing columns are named."""
    model, proc = _load(qwen_vl_dir)
    pairs = [{"images": r["images"], "prompt": r["prompt"], "chosen": "red", "rejected": "blue"} for r in _rows()[:2]]
    trainer = _trainer(model, proc, tmp_path, rows=pairs)
    assert [ex["label"] for ex in trainer.train_examples] == [True, False, True, False]
    assert trainer.train_examples[0]["prompt_ids"] == trainer.train_examples[1]["prompt_ids"]
    rows = _rows()
    rows[2]["label"] = 1
    with pytest.raises(DataError, match="Row 2: field 'label' must be true .* int 1"):
        _trainer(model, proc, tmp_path, rows=rows)
    rows = _rows()
    rows[1]["completion"] = [{"role": "assistant", "content": [{"type": "image", "image": solid_image((1, 2, 3))}]}]
    with pytest.raises(DataError, match="Row 1: images go in the prompt; 'completion' holds the assistant's text"):
        _trainer(model, proc, tmp_path, rows=rows)
    with pytest.raises(DataError, match="no column 'label'"):
        _trainer(model, proc, tmp_path, rows=[{k: v for k, v in r.items() if k != "label"} for r in _rows()])


def test_cli_kto_with_image_files(qwen_vl_dir, tmp_path, capsys):
    """`fasttune train --method kto` on a vision-language model: rows naming image files beside the data file."""
    from fasttune.cli import main

    rows = _rows()
    for i, row in enumerate(rows):
        row["images"][0].save(tmp_path / f"img{i}.png")
        row["images"] = [f"img{i}.png"]  # (relative to the data file)
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(["train", "--method", "kto", "--model", str(qwen_vl_dir), "--data", str(tmp_path / "kto.jsonl"),
               "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--lora-r", "4", "--batch-size", "2",
               "--grad-accum", "1", "--no-sample"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
