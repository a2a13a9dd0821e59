"""packing=True for vision-language models (data/packing.py's media, models/vision.py's packed_rope_index): a packed
row of image + text documents gives each document the logits it gets alone (its own multimodal RoPE positions on
Qwen, its own two-way image attention on Gemma, its own image-per-row tiling on LLaVA-OneVision, its own images'
cross-attention on Llama 3.2 Vision, its own prefix on PaliGemma), so the packed loss
sum is the documents' sum; SFTTrainer(packing=True) trains on such rows."""
import pytest
import torch
from tiny_vision import noise_image

from fasttune.data.packing import pack_examples


def _docs():
    """Three conversations: one image, none, two images (of other sizes)."""
    def row(content, answer):
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    return [row([{"type": "image", "image": noise_image((56, 56), 1)}, {"type": "text", "text": "what is it?"}],
                "noise"),
            row([{"type": "text", "text": "no picture here"}], "fine, words only"),
            row([{"type": "image", "image": noise_image((84, 56), 2)}, {"type": "text", "text": "and these"},
                 {"type": "image", "image": noise_image((56, 84), 3)}], "two more")]


def test_a_packed_row_gives_each_document_its_own_logits(vl_dir):
    from fasttune import FastVisionModel
    from fasttune.data.vision_rows import VisionEncoder, collate_vision

    model, proc = FastVisionModel.from_pretrained(str(vl_dir), device="cpu")
    encoder = VisionEncoder(proc, 1024, train_on_responses_only=False)
    examples = [encoder.encode(row, i) for i, row in enumerate(_docs())]
    packed = pack_examples(examples, 4096)
    order = sorted(examples, key=lambda e: -len(e["input_ids"]))  # (best-fit decreasing: the longest first)
    assert len(packed) == 1 and packed[0]["image_rows"] == [len(e["images"]) for e in order]
    assert sorted(packed[0]["image_rows"]) == [0, 1, 2]
    batch = collate_vision(packed, proc)
    assert batch["segment_ids"].unique().tolist() == [1, 2, 3]
    with torch.no_grad():  # (Llama 3.2 Vision: each document's text attends its own images through cross-attention)
        out = model(**batch)
        segments = batch["segment_ids"][0]
        total = torch.zeros(())
        for k, example in enumerate(order):
            single = collate_vision([example], proc)
            alone = model(**single)
            if model.family.mrope:  # each document's multimodal positions from 0, as alone (text packing: the same)
                packed_pos, _ = model.packed_rope_index(batch["input_ids"], batch["segment_ids"],
                                                        batch.get("image_grid_thw"))
                own, _ = model.rope_index(single["input_ids"], single.get("image_grid_thw"))
                assert torch.equal(packed_pos[:, 0, segments == k + 1], own[:, 0])
            torch.testing.assert_close(out.logits[0, segments == k + 1], alone.logits[0], rtol=1e-4, atol=1e-4)
            total += _loss_sum(alone.logits, single["labels"])
    torch.testing.assert_close(_loss_sum(out.logits, batch["labels"]), total, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, total / (batch["labels"][:, 1:] != -100).sum(), rtol=1e-5, atol=1e-5)


def _loss_sum(logits, labels):
    """The summed next-token cross-entropy of the targets (labels != -100)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


def test_sft_trainer_trains_packed_vision_rows(qwen_vl_dir, tmp_path):
    """One optimizer step over the three documents: packed into one row or batched as three, the same targets, so the
    same first loss (documents that saw each other would change it)."""
    from fasttune import FastVisionModel, SFTConfig, SFTTrainer

    first = {}
    for packing in (False, True):
        model, proc = FastVisionModel.from_pretrained(str(qwen_vl_dir), device="cpu")
        model = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=False)
        trainer = SFTTrainer(model, proc, train_dataset=_docs(),
                             args=SFTConfig(output_dir=str(tmp_path / str(packing)), max_steps=1, packing=packing,
                                            per_device_train_batch_size=3, max_seq_length=1024, report_to="none",
                                            save_strategy="no", learning_rate=0.0))
        assert len(trainer.train_examples) == (1 if packing else 3)
        trainer.train()
        first[packing] = trainer.log_history[0]["loss"]
    assert first[True] == pytest.approx(first[False], rel=1e-5)
