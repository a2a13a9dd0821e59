"""Packing: best-fit-decreasing rows, per-document positions, no attention or label across documents."""
import random

import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.data.collate import collate, count_targets
from fasttune.data.packing import pack_examples


def _examples(n=11, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 15))]
        labels = list(ids)
        if rng.random() < 0.5:
            labels[:2] = [-100] * len(labels[:2])  # a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_rows_fit_and_hold_every_example_once():
    ex = _examples(40)
    rows = pack_examples(ex, capacity=32)
    assert all(len(r["input_ids"]) <= 32 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in ex)
    assert len(rows) <= -(-sum(len(e["input_ids"]) for e in ex) // 32) + 2  # best fit wastes little
    docs = sorted(tuple(r["input_ids"][i:j]) for r in rows for i, j in _spans(r["segment_ids"]))
    assert docs == sorted(tuple(e["input_ids"]) for e in ex)
    for r in rows:
        for i, j in _spans(r["segment_ids"]):
            assert r["position_ids"][i:j] == list(range(j - i)) and r["labels"][i] == -100


def _spans(seg):
    start = 0
    for k in range(1, len(seg) + 1):
        if k == len(seg) or seg[k] != seg[start]:
            yield start, k
            start = k


def test_packed_loss_and_grads_equal_unpacked(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("gemma2")))  # sliding window + softcap too
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    ex = _examples(9, seed=1)

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for b in batches:
            out = model(**b)
            out.loss_sum.backward()
            total += float(out.loss_sum)
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # Unpacked: each example alone; its first label is dropped too, as packing does.
    singles = [collate([{"input_ids": e["input_ids"], "labels": [-100] + e["labels"][1:]}], 0) for e in ex]
    packed_rows = pack_examples(ex, capacity=24)
    packed = [collate(packed_rows[i:i + 2], 0) for i in range(0, len(packed_rows), 2)]
    assert sum(count_targets(b["labels"]) for b in packed) == sum(count_targets(b["labels"]) for b in singles)
    want, want_g = loss_and_grads(singles)
    got, got_g = loss_and_grads(packed)
    assert abs(got - want) / want < 1e-5
    for n in want_g:  # fp32 sums in other orders (packed rows, banded window blocks): ~1.5e-6 of the largest entry
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=4e-6 * float(want_g[n].abs().max()), msg=n)


def test_trainer_with_packing(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    rows = [{"text": "short " * (1 + i % 4)} for i in range(24)]
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_seq_length=64, max_steps=3, learning_rate=1e-2,
                     per_device_train_batch_size=1, gradient_accumulation_steps=1)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
    assert len(trainer.train_examples) < 24 and "segment_ids" in trainer.train_examples[0]
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history]
    assert losses[-1] < losses[0]


def test_changing_one_document_leaves_the_other_untouched(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3")))
    a, b = {"input_ids": list(range(10, 19))}, {"input_ids": list(range(40, 47))}
    a2 = {"input_ids": list(range(100, 109))}
    rows = [pack_examples([a, b], capacity=32)[0], pack_examples([a2, b], capacity=32)[0]]
    batch = collate(rows, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]).logits
    in_b = batch["segment_ids"] == batch["segment_ids"][0, -1]  # b is packed last (shorter) in both rows
    assert not torch.allclose(logits[0][~in_b[0]], logits[1][~in_b[1]])
    assert torch.equal(logits[0][in_b[0]], logits[1][in_b[1]])


def test_five_packed_steps_equal_five_padded_steps(tiny_model_dir, tmp_path):
    """Each step covers every row (one micro-batch holds them all), so both runs see the same rows per step."""
    rows = [{"text": "doc " + "xy " * (1 + i % 5)} for i in range(8)]
    runs = {}
    for packing in (False, True):
        model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
        args = SFTConfig(output_dir=str(tmp_path / str(packing)), packing=packing, max_seq_length=32, max_steps=5,
                         learning_rate=1e-2, per_device_train_batch_size=8, gradient_accumulation_steps=1)
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
        if packing:  # rows really were packed; a document's first label never counts in either layout
            assert len(trainer.train_examples) < 8
        trainer.train()
        runs[packing] = ([h["loss"] for h in trainer.log_history],
                         {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-5, atol=0)
    for n, p in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][n], p, rtol=1e-4, atol=1e-6, msg=n)
