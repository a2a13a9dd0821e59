"""The SFT trainer against a transformers+PEFT reference loop, and gradient-accumulation invariance."""
import pytest
import torch
from peft_oracle import peft_twin, reference_sft_losses

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError


def _rows(n=16):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    # Different lengths so that batches carry padding and micro-batches hold different token counts.
    return [{"text": " ".join(words[(i + j) % 6] for j in range(2 + (i * 7) % 9))} for i in range(n)]


def _setup(folder, **lora):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, **lora)
    return model, tok


def test_20_steps_equal_transformers_peft_loop(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model, tok = _setup(folder)
    model.save_pretrained(tmp_path / "init")
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=5e-3, lr_scheduler_type="constant", max_steps=20, max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    batches = trainer.step_batches(0, 0)  # the very batches the trainer will see, for the reference loop
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]

    ref = peft_twin("llama", tmp_path / "init").train()
    theirs = reference_sft_losses(ref, batches, 20, lr=5e-3)
    assert len(ours) == 20 and ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=0)


def _final_adapter(folder, tmp_path, bs, ga, **cfg):
    model, tok = _setup(folder, modules_to_save=cfg.pop("modules_to_save", None))
    args = SFTConfig(output_dir=str(tmp_path / f"o{bs}x{ga}"), per_device_train_batch_size=bs,
                     gradient_accumulation_steps=ga, learning_rate=1e-2, max_steps=3, **cfg)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(12), args=args)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


def test_gradient_accumulation_is_invariant(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("qwen2")
    a, ta = _final_adapter(folder, tmp_path, 4, 1)
    b, tb = _final_adapter(folder, tmp_path, 2, 2)
    c, tc = _final_adapter(folder, tmp_path, 1, 4)
    assert a.keys() == b.keys() == c.keys()
    assert all(a[n].abs().max() > 1e-3 for n in a if "lora_B" in n)  # trained (B starts at zero)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(c[n], a[n], rtol=1e-4, atol=1e-6, msg=n)
    la, lb, lc = ([h["loss"] for h in t.log_history] for t in (ta, tb, tc))
    assert len(la) == 3
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(lc), torch.tensor(la), rtol=1e-5, atol=0)


def test_logged_loss_averages_the_logging_window(tiny_model_dir, tmp_path):
    """logging_steps=2: each logged loss is the mean of its window's per-step losses (the last, short window
    too), the per-step losses being those a logging_steps=1 run of the same training logs."""
    folder = tiny_model_dir("llama")
    runs = {}
    for every in (1, 2):
        model, tok = _setup(folder)
        args = SFTConfig(output_dir=str(tmp_path / f"log{every}"), per_device_train_batch_size=2, max_steps=5,
                         learning_rate=1e-2, logging_steps=every)
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(12), args=args)
        trainer.train()
        runs[every] = [(h["step"], h["loss"]) for h in trainer.log_history if "loss" in h]
    steps = [loss for _, loss in runs[1]]
    assert [s for s, _ in runs[1]] == [1, 2, 3, 4, 5] and [s for s, _ in runs[2]] == [2, 4, 5]
    want = [(steps[0] + steps[1]) / 2, (steps[2] + steps[3]) / 2, steps[4]]
    torch.testing.assert_close(torch.tensor([loss for _, loss in runs[2]]), torch.tensor(want), rtol=1e-6, atol=0)


def test_embedding_learning_rate_zero_freezes_embeddings(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model, tok = _setup(folder, modules_to_save=["embed_tokens", "lm_head"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(output_dir=str(tmp_path / "o"), learning_rate=1e-2, embedding_learning_rate=0.0, max_steps=3,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1)
    SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args).train()
    after = dict(model.named_parameters())
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    moved = [n for n in before if "lora_A" in n and not torch.equal(after[n], before[n])]
    assert len(moved) == len([n for n in before if "lora_A" in n])


@pytest.mark.parametrize("kind, kwargs", [("linear", None), ("cosine", None), ("constant_with_warmup", None),
                                          ("cosine_with_min_lr", {"min_lr": 2e-4}),  # absolute: the optimizer's lr
                                          ("polynomial", {"lr_end": 1e-5, "power": 2.0})])
def test_lr_schedule_matches_transformers(kind, kwargs, tiny_model_dir, tmp_path):
    from transformers import get_scheduler

    model, tok = _setup(tiny_model_dir("llama"))
    # 3e-3, not AdamW's own default lr: polynomial's lr_end and min_lr are absolute, so they read the optimizer's lr
    args = SFTConfig(output_dir=str(tmp_path / "o"), learning_rate=3e-3, max_steps=8, warmup_steps=3,
                     lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    trainer.train()
    ours = [h["learning_rate"] for h in trainer.log_history]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-3)
    sched = get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=8, scheduler_specific_kwargs=kwargs)
    theirs = []
    for _ in range(8):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_formatting_func(tiny_model_dir, tmp_path):
    """TRL's formatting_func: its string per row is the text trained on (the same losses as those rows given as
    text), for the eval rows too; a function that returns a list (the old batched convention) is named."""
    from fasttune.errors import DataError

    rows = [{"q": f"alpha {i}", "a": "beta gamma"} for i in range(8)]
    fmt = lambda r: f"Q: {r['q']} A: {r['a']}"  # noqa: E731
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=1)
    a = SFTTrainer(model=model, processing_class=tok, train_dataset=rows, eval_dataset=rows[:2],
                   args=SFTConfig(output_dir=str(tmp_path / "a")), formatting_func=fmt)
    model2, tok2 = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model2 = FastLanguageModel.get_peft_model(model2, r=4, random_state=1)
    b = SFTTrainer(model=model2, processing_class=tok2, train_dataset=[{"text": fmt(r)} for r in rows],
                   args=SFTConfig(output_dir=str(tmp_path / "b")))
    assert a.train_examples == b.train_examples and len(a.eval_examples) == 2
    with pytest.raises(DataError, match="returned list for row 0.*for one row"):
        SFTTrainer(model=model2, processing_class=tok2, train_dataset=rows, args=SFTConfig(output_dir=str(tmp_path / "c")),
                   formatting_func=lambda r: [fmt(r)])


def test_data_collator_builds_the_batches(tiny_model_dir, tmp_path):
    """transformers' Trainer contract: a given data_collator makes every batch. DataCollatorForSeq2Seq pads as our
    own batching does (the same losses, bit for bit, also padded to a multiple of 8); a collator's own labels are
    what is trained on."""
    from transformers import DataCollatorForSeq2Seq

    folder = tiny_model_dir("llama")
    rows = [{"prompt": f"alpha {i}", "completion": " beta gamma" * (1 + i % 3)} for i in range(8)]

    def run(name, collator=None, **cfg):
        model, tok = _setup(folder)
        args = SFTConfig(output_dir=str(tmp_path / name), learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, lr_scheduler_type="constant", **cfg)
        t = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, data_collator=collator)
        t.train()
        return t, [h["loss"] for h in t.log_history]

    own, own_losses = run("own")
    _, tok = _setup(folder)
    assert run("seq2seq", DataCollatorForSeq2Seq(tok))[1] == own_losses
    eights, losses = run("eights", DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8))
    assert losses == own_losses and eights.collate_batch(eights.train_examples[:3])["input_ids"].shape[1] % 8 == 0

    def last_token_only(features):  # a collator of one's own: only each row's last token is a target
        batch = DataCollatorForSeq2Seq(tok)(features)
        batch["labels"][:] = -100
        for row, f in enumerate(features):
            batch["labels"][row, len(f["input_ids"]) - 1] = f["input_ids"][-1]
        return batch

    mine, losses = run("mine", last_token_only)
    assert losses != own_losses and (mine.collate_batch(mine.train_examples[:4])["labels"] != -100).sum() == 4
    with pytest.raises(ConfigError, match="packing=True with a data_collator"):
        run("packed", DataCollatorForSeq2Seq(tok), packing=True)


@pytest.mark.parametrize("collator, match", [
    (lambda feats: {"input_ids": [f["input_ids"] for f in feats]}, r"returned no attention_mask"),
    (lambda feats: [1, 2], r"returned list; it must return a dict"),
    (lambda feats: {k: [f[k] for f in feats] for k in feats[0]}, r"not one \(batch, length\) array.*must pad"),
    (lambda feats: {"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "labels": [[1, 2, 3]]}, r"shapes"),
])
def test_data_collator_output_is_checked(collator, match, tiny_model_dir, tmp_path):
    from fasttune.errors import DataError

    model, tok = _setup(tiny_model_dir("llama"))
    t = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(4), data_collator=collator,
                   args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1))
    with pytest.raises(DataError, match=match):
        t.train()
    with pytest.raises(ConfigError, match="data_collator must be a function"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(4), data_collator="pad",
                   args=SFTConfig(output_dir=str(tmp_path / "p"), max_steps=1))
