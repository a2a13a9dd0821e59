"""SFTTrainer on image + text conversations (train/objectives/vision_sft.py) with tiny random Qwen2.5-VL and
Gemma 3: the loss curve equals transformers + PEFT on the same batches, gradient accumulation over images of
different sizes equals the bigger batch, bad rows are DataErrors naming the row, and the model learns to name
colours."""
import json
import random

import pytest
import torch
from tiny_vision import oracle_inputs as _oracle_inputs, solid_image

from fasttune.errors import DataError

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 210)}


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = rng.choice(sorted(COLOURS))
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[name])
        size = (rng.choice([28, 56, 84]), rng.choice([28, 56]))
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": solid_image(shade, size)},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": name}]}], "answer": name})
    return rows


def _load(folder, r=8):
    from fasttune import FastVisionModel

    model, proc = FastVisionModel.from_pretrained(str(folder))
    model = FastVisionModel.get_peft_model(model, r=r, lora_alpha=r, finetune_vision_layers=True,
                                           use_gradient_checkpointing=False)
    return model, proc


def _train(model, proc, rows, out, **args):
    from fasttune import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(out), report_to="none", logging_steps=1, save_steps=10_000, shuffle=False,
                       **{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                          "max_steps": 4, **args})
    trainer = SFTTrainer(model=model, tokenizer=proc, train_dataset=rows, args=config)
    trainer.train()
    return [h["loss"] for h in trainer.log_history if "loss" in h], trainer.log_history


def test_loss_curve_equals_transformers_and_peft(vl_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, get_linear_schedule_with_warmup

    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    rows, steps = _rows(16, seed=1), 10  # 8 batches of 2 per pass: the second pass (in the same order) too
    model, proc = _load(vl_dir)
    model.save_pretrained(tmp_path / "init")  # the same starting adapter for PEFT
    # (the reference loop adds no MoE load-balancing loss: off here, as in tests/models/test_moe.py)
    ours, history = _train(model, proc, rows, tmp_path / "run", max_steps=steps, router_aux_loss_coef=0.0)

    ref = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vl_dir),
                                    str(tmp_path / "init"), is_trainable=True).train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    enc = VisionEncoder(proc, 2048, False)
    examples = [enc.encode(r, i) for i, r in enumerate(rows)]
    losses, stats = [], []
    for step in range(steps):
        batch = collate_vision(examples[2 * step % 16: 2 * step % 16 + 2], proc)
        out = ref(**{**batch, **_oracle_inputs(vl_dir, batch, proc)})
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        stats.append(_token_stats(out.logits, batch["labels"]))
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(losses), rtol=2e-4, atol=1e-5)
    # TRL's SFT token metrics on images too
    got = [(h["entropy"], h["mean_token_accuracy"]) for h in history if "loss" in h]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(stats), rtol=2e-4, atol=1e-5)


def _token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean entropy, share of first-argmax hits) over the target tokens, from full logits (the oracle)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[keep], -1)
    entropy = -(logp.exp() * logp).sum(-1)
    hits = logits[keep].argmax(-1) == labels[keep]  # argmax: the first maximal index
    return entropy.mean().item(), hits.float().mean().item()


def test_gradient_accumulation_over_images_of_different_sizes(qwen_vl_dir, tmp_path):
    rows = _rows(8, seed=2)
    model, proc = _load(qwen_vl_dir)
    big, _ = _train(model, proc, rows, tmp_path / "big", per_device_train_batch_size=4, max_steps=2)
    model, proc = _load(qwen_vl_dir)
    accumulated, _ = _train(model, proc, rows, tmp_path / "ga", per_device_train_batch_size=1,
                            gradient_accumulation_steps=4, max_steps=2)
    torch.testing.assert_close(torch.tensor(accumulated), torch.tensor(big), rtol=1e-5, atol=1e-6)


def test_bad_image_rows_name_the_row(qwen_vl_dir, tmp_path):
    from fasttune import SFTConfig, SFTTrainer

    model, proc = _load(qwen_vl_dir)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    solid_image("red").save(tmp_path / "ok.png")
    for image, match in [("missing.png", "does not exist"), ("broken.png", "cannot be read")]:
        rows = _rows(2, seed=3)
        rows[0]["messages"][0]["content"][0]["image"] = "ok.png"  # relative to the data file
        rows[1]["messages"][0]["content"][0]["image"] = image
        data = tmp_path / "rows.jsonl"
        data.write_text("\n".join(json.dumps({"messages": r["messages"]}) for r in rows))
        with pytest.raises(DataError, match=rf"Row 1, image 1: .*{match}"):
            SFTTrainer(model=model, tokenizer=proc, train_dataset=str(data),
                       args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1))
    with pytest.raises(DataError, match="Row 0: .* max_seq_length"):
        SFTTrainer(model=model, tokenizer=proc, train_dataset=_rows(1, seed=4),
                   args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, max_seq_length=8))


def _accuracy(model, proc, rows) -> float:
    hits = 0
    for row in rows:
        prompt = proc.apply_chat_template(row["messages"][:1], add_generation_prompt=True)
        batch = proc(text=[prompt], images=[row["messages"][0]["content"][0]["image"]])
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        hits += proc.decode(out[0, batch["input_ids"].shape[1]:]).startswith(row["answer"])
    return hits / len(rows)


def test_learns_to_name_the_colour_of_held_out_images(vl_train_dir, tmp_path):
    model, proc = _load(vl_train_dir, r=16)
    held_out = _rows(30, seed=99)
    before = _accuracy(model, proc, held_out)
    _train(model, proc, _rows(96, seed=5), tmp_path / "learn", per_device_train_batch_size=8, max_steps=60,
           train_on_responses_only=True, learning_rate=1e-2)
    after = _accuracy(model, proc, held_out)
    assert before < 0.5 and after > 0.9, (before, after)


def test_eval_loss_is_the_target_token_mean(qwen_vl_dir, tmp_path):
    from fasttune import SFTConfig, SFTTrainer
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = _load(qwen_vl_dir)
    rows = _rows(5, seed=6)
    trainer = SFTTrainer(model=model, tokenizer=proc, train_dataset=rows, eval_dataset=rows,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_eval_batch_size=2))
    enc = VisionEncoder(proc, 2048, False)
    examples = [enc.encode(r, i) for i, r in enumerate(rows)]
    batch = collate_vision(examples, proc)
    with torch.no_grad():
        want = model.eval()(**batch).loss.item()  # one batch: the mean over all target tokens
        # TRL's eval token metrics: the mean over the eval batches (2, 2, 1 rows) of each batch's mean
        parts = [_token_stats(model(**b, return_logits=True).logits, b["labels"])
                 for b in (collate_vision(examples[i:i + 2], proc) for i in range(0, 5, 2))]
    got = trainer.evaluate()
    assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert got["eval_entropy"] == pytest.approx(sum(p[0] for p in parts) / 3, rel=1e-5)
    assert got["eval_mean_token_accuracy"] == pytest.approx(sum(p[1] for p in parts) / 3, abs=1e-6)


def test_label_smoothing_and_neftune_on_images(qwen_vl_dir, tmp_path):
    """label_smoothing_factor reaches the vision-language model's chunked loss (its eval loss equals the smoothed
    mean of the full logits); NEFTune's hook sits on the text embeddings the images are merged into."""
    from fasttune import SFTConfig, SFTTrainer
    from fasttune.data.vision_rows import VisionEncoder, collate_vision
    from transformers.trainer_pt_utils import LabelSmoother

    model, proc = _load(qwen_vl_dir)
    rows = _rows(3, seed=8)
    trainer = SFTTrainer(model=model, tokenizer=proc, train_dataset=rows, eval_dataset=rows,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_eval_batch_size=4,
                                        label_smoothing_factor=0.2, neftune_noise_alpha=5.0))
    batch = collate_vision([VisionEncoder(proc, 2048, False).encode(r, i) for i, r in enumerate(rows)], proc)
    with torch.no_grad():
        logits = model.eval()(**batch, return_logits=True).logits
    want = LabelSmoother(epsilon=0.2)((logits,), batch["labels"], shift_labels=True).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)
    trainer.train()
    assert trainer.log_history[0]["loss"] > 0 and not model.get_input_embeddings()._forward_hooks
