"""DPOTrainer on preference pairs with images (data/vision_preference.py) for tiny random Qwen2.5-VL and Gemma 3:
rows laid out as TRL's vision DPO collator lays them out, the loss curve equal to DPO computed on transformers +
PEFT with the same batches (the reference: the same model with the adapter switched off), and for Qwen2.5-VL to TRL
1.16's own DPOTrainer (tests/fixtures/vision_dpo_trl.json, written by it where torchvision is installed)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_vision import image_count, oracle_inputs, solid_image

from fasttune.constants import IMAGE_KEYS
from fasttune.errors import ConfigError, DataError

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 210)}
STEPS, BETA, LR = 4, 0.5, 2e-2
TRL_ORACLE = Path(__file__).resolve().parents[2] / "fixtures" / "vision_dpo_trl.json"


def _rows(n: int) -> list[dict]:
    names = sorted(COLOURS)
    rows = []
    for i in range(n):
        right, wrong = names[i % 3], names[(i + 1) % 3]
        rows.append({"images": [solid_image(COLOURS[right], (28 * (1 + i % 2), 56))],
                     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": right}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"{wrong}, I think"}]}]})
    return rows


def _load(folder):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(folder), dtype=torch.float32)
    return FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), proc


@pytest.fixture(params=["qwen_vl_dir", "gemma3_vl_dir", "idefics3_vl_dir", "internvl_vl_dir", "llava_vl_dir",
                        "mllama_vl_dir", "paligemma_vl_dir"])
def vl_folder(request):
    return request.getfixturevalue(request.param)


def test_loss_curve_equals_dpo_on_transformers_and_peft(vl_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, get_linear_schedule_with_warmup

    from fasttune import DPOConfig, DPOTrainer

    rows, steps, beta = _rows(4), STEPS, BETA
    model, proc = _load(vl_folder)
    model.save_pretrained(tmp_path / "init")  # the same starting adapter (LoRA B zero) for PEFT
    trainer = DPOTrainer(model=model, processing_class=proc, train_dataset=rows,
                         args=DPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR,
                                        beta=beta, logging_steps=1, shuffle=False))
    batches = [trainer.collate_batch(trainer.train_examples[i:i + 2]) for i in (0, 2)]
    first = batches[0]
    prompt = proc.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True)
    prompt_ids = proc(text=[prompt], images=rows[0]["images"])["input_ids"][0].tolist()
    whole = proc.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"])
    chosen_ids = proc.tokenizer(whole[len(prompt):], add_special_tokens=False)["input_ids"]
    n = len(prompt_ids) + len(chosen_ids)
    assert first["input_ids"][0, :n].tolist() == prompt_ids + chosen_ids  # TRL's layout: prompt, then completion
    assert first["completion_mask"][0].tolist() == [0] * len(prompt_ids) + [1] * len(chosen_ids) + \
        [0] * (first["input_ids"].shape[1] - n)
    assert image_count(first, proc) == 4  # each pair's image for its chosen and its rejected row
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]

    ref = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vl_folder, dtype=torch.float32),
                                    str(tmp_path / "init"), is_trainable=True).train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)

    def summed_logps(batch):
        media = {k: v for k, v in batch.items() if k in IMAGE_KEYS}
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     **{**media, **oracle_inputs(vl_folder, batch, proc)}).logits
        # (the prompt's ids may lie past the vocabulary: Llama 3.2 Vision's <|image|>; masked out below)
        ids = batch["input_ids"][:, 1:, None].clamp(max=logits.shape[-1] - 1)
        logps = logits[:, :-1].float().log_softmax(-1).gather(-1, ids).squeeze(-1)
        return (logps * batch["completion_mask"][:, 1:]).sum(-1)

    losses = []
    for step in range(steps):
        batch = batches[step % 2]
        with torch.no_grad(), ref.disable_adapter():
            ref_c, ref_r = summed_logps(batch).chunk(2)
        pol_c, pol_r = summed_logps(batch).chunk(2)
        loss = -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - 0.6931) < 1e-3 and losses[2] < losses[0]  # (step 1: the policy is the reference)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(losses), rtol=2e-4, atol=1e-5)
    if "qwen" in str(vl_folder):  # TRL's DPOTrainer itself, on transformers + PEFT (see the module docstring)
        trl = json.loads(TRL_ORACLE.read_text())["qwen2_5_vl_losses"]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(trl), rtol=2e-4, atol=1e-5)


def test_bad_rows_and_other_objectives(qwen_vl_dir, tmp_path):
    """Rows without their images, images in a completion, and ORPO / KTO on a vision-language model are named."""
    from fasttune import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer

    model, proc = _load(qwen_vl_dir)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1)
    rows = _rows(2)
    del rows[1]["images"]
    with pytest.raises(DataError, match="Row 1: message 1 has an image item without its image"):
        DPOTrainer(model=model, processing_class=proc, train_dataset=rows, args=args)
    rows = _rows(2)
    rows[1]["images"].append(solid_image((1, 2, 3)))
    with pytest.raises(DataError, match="Row 1: the row gives 2 images but its prompt has places .* for 1"):
        DPOTrainer(model=model, processing_class=proc, train_dataset=rows, args=args)
    rows = _rows(2)
    rows[0]["chosen"][0]["content"].append({"type": "image", "image": solid_image((1, 2, 3))})
    with pytest.raises(DataError, match="Row 0: images go in the prompt"):
        DPOTrainer(model=model, processing_class=proc, train_dataset=rows, args=args)
    with pytest.raises(ConfigError, match="ORPOTrainer does not train vision-language models yet"):
        ORPOTrainer(model=model, processing_class=proc, train_dataset=_rows(2),
                    args=ORPOConfig(output_dir=str(tmp_path), max_steps=1))
    with pytest.raises(ConfigError, match="takes the processor"):
        DPOTrainer(model=model, processing_class=proc.tokenizer, train_dataset=_rows(2), args=args)


def test_cli_dpo_with_image_files(qwen_vl_dir, tmp_path, capsys):
    """`fasttune train --method dpo` on a vision-language model: rows naming image files beside the data file."""
    from fasttune.cli import main

    rows = _rows(2)
    for i, row in enumerate(rows):
        row["images"][0].save(tmp_path / f"img{i}.png")
        row["images"] = [f"img{i}.png"]  # (relative to the data file)
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(["train", "--method", "dpo", "--model", str(qwen_vl_dir), "--data", str(tmp_path / "prefs.jsonl"),
               "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--lora-r", "4", "--batch-size", "2",
               "--grad-accum", "1"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_precomputed_reference_columns(qwen_vl_dir, tmp_path):
    """ref_chosen_logps / ref_rejected_logps in the rows replace the reference passes (no reference policy); one of
    the two alone is named."""
    from fasttune import DPOConfig, DPOTrainer

    model, proc = _load(qwen_vl_dir)
    rows = [dict(r, ref_chosen_logps=-5.0, ref_rejected_logps=-3.0) for r in _rows(2)]
    trainer = DPOTrainer(model=model, processing_class=proc, train_dataset=rows,
                         args=DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=1))
    assert trainer.reference is None and trainer.train_examples[0]["ref_chosen_logps"] == -5.0
    batch = trainer.collate_batch(trainer.train_examples)
    assert batch["ref_rejected_logps"].tolist() == [-3.0, -3.0]
    with pytest.raises(DataError, match="ref_chosen_logps' but not its pair"):
        DPOTrainer(model=model, processing_class=proc, args=DPOConfig(output_dir=str(tmp_path), max_steps=1),
                   train_dataset=[dict(r, ref_chosen_logps=-5.0) for r in _rows(2)])


@pytest.mark.parametrize("folder", ["qwen_video_dir", "onevision_video_dir"])
def test_video_prompts(folder, request, tmp_path):
    """Pairs (DPO) and unpaired rows (KTO) whose prompts hold a video (Qwen2.5-VL's timed patches, LLaVA-OneVision's
    pooled frames): each row's ids are the processor's for the conversation, the batch carries each pair's video for
    its chosen and its rejected row, and a DPO step trains."""
    from PIL import Image
    from tiny_vision import patterned_frames

    from fasttune import DPOConfig, DPOTrainer
    from fasttune.data.vision_preference import collate_vision_pairs, tokenize_vision_unpaired_rows

    model, proc = _load(request.getfixturevalue(folder))
    clips = [[Image.fromarray(f) for f in patterned_frames(4, 56, 28 * (1 + k))] for k in range(2)]
    rows = [{"prompt": [{"role": "user", "content": [{"type": "video", "video": frames},
                                                     {"type": "text", "text": "Moving?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "no, still"}]}]}
            for frames in clips]
    trainer = DPOTrainer(model=model, processing_class=proc, train_dataset=rows,
                         args=DPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=1,
                                        learning_rate=LR, beta=BETA, logging_steps=1, report_to="none"))
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Moving?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    for ex, frames in zip(trainer.train_examples, clips):
        assert ex["prompt_ids"] == proc(text=[text], videos=[frames])["input_ids"][0].tolist()
    batch = collate_vision_pairs(trainer.train_examples, proc)
    direct = proc(text=[text, text], videos=clips)
    if "video_grid_thw" in direct:  # (Qwen) chosen rows then rejected rows, each pair's video twice
        assert batch["video_grid_thw"].tolist() == 2 * direct["video_grid_thw"].tolist()
    else:  # (OneVision: frames of the tower's size) the pairs' videos, then again
        torch.testing.assert_close(batch["pixel_values_videos"], torch.cat([direct["pixel_values_videos"]] * 2))
    # the policy's forward sees the videos: the same pairs score otherwise after the frames change
    swapped = [dict(ex, videos=[(list(reversed(clip)), None)]) for ex, clip in zip(trainer.train_examples, clips)]
    scored = [trainer.logps(trainer.to_device(trainer.collate_batch(exs))) for exs in (trainer.train_examples, swapped)]
    assert not torch.allclose(*scored)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.log_history[0]["loss"]))
    unpaired = tokenize_vision_unpaired_rows(rows, proc, max_seq_length=512)
    assert len(unpaired) == 4 and all(len(ex["videos"]) == 1 for ex in unpaired)
