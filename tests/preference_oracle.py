"""TRL 1.16 as the oracle for DPO / ORPO / KTO: our LoRA model and its transformers+PEFT twin with the same
adapter (LoRA B randomised, so the policy differs from the reference), and one step's loss and gradients."""
from contextlib import contextmanager

import torch
from peft_oracle import peft_grads, peft_twin, randomize_lora_b

from fasttune import FastLanguageModel

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def pair_rows(n=8):
    # Different lengths, so that batches carry padding.
    return [{"prompt": f"Q{i}: {WORDS[i % 5]}?", "chosen": " yes " + "ok " * (1 + i % 3),
             "rejected": " no" + "!" * (1 + (i * 2) % 5)} for i in range(n)]


def unpaired_rows(n=8):
    return [{"prompt": f"Q{i}: {WORDS[i % 5]}?", "completion": " " + "so " * (1 + i % 4), "label": i % 3 != 1}
            for i in range(n)]


def lora_pair(folder, tmp_path, family="llama"):
    """(our model, tokenizer, PEFT twin) with one adapter; LoRA B random so the adapter is not the identity.
    `family`: the tiny family `folder` holds (the twin is built from it)."""
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "init")
    return model, tok, peft_twin(family, tmp_path / "init").train()


def attention_lora_pair(folder, tmp_path, family):
    """(our model, tokenizer, PEFT twin) with LoRA on the attention projections only (B random): for models whose
    other LoRA names differ between fasttune and PEFT (the stacked experts of a mixture of experts)."""
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "init")
    return model, tok, peft_twin(family, tmp_path / "init").train()


def our_step(trainer, n=4):
    """Loss and gradients of the trainer's objective on its first n examples as one micro-batch."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    batch = trainer.to_device(trainer.collate_batch(trainer.train_examples[:n]))
    trainer.prepare_step([batch], across_ranks=True)
    loss, _ = trainer.micro_batch_loss(batch, trainer.count_items(batch))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def shift_policy(model, twin, seed=7):
    """After both trainers took their reference (TRL: a "ref" copy of the given adapter; fasttune: ReferencePolicy),
    move the policy's LoRA B the same way on both sides, so that policy and reference differ."""
    g = torch.Generator().manual_seed(seed)
    theirs = {n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight"): p
              for n, p in twin.named_parameters() if ".default." in n and "lora_B" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                delta = torch.randn(p.shape, generator=g) * 0.05
                p.add_(delta)
                theirs.pop(n).add_(delta)
    assert not theirs


def trl_step(trl_trainer, twin, batch):
    # TRL copies the adapter it is given as the reference ("ref"), as fasttune's ReferencePolicy does.
    twin.zero_grad(set_to_none=True)
    loss = trl_trainer.compute_loss(twin, batch)
    loss.backward()
    return loss.detach(), peft_grads(twin)


def trl_pair_features(ex):
    """Our tokenized pair (prompt_ids, chosen_ids, rejected_ids) in the layout the collators of TRL's legacy
    preference trainers (experimental ORPO and CPO) pad: labels -100 on the prompt."""
    p = ex["prompt_ids"]
    out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
    for side in ("chosen", "rejected"):
        ids = p + ex[f"{side}_ids"]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(p) + ex[f"{side}_ids"]})
    return out


def trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, use_cpu=True, report_to=[], bf16=False,
               save_strategy="no", **kw)


def assert_same_step(ours, theirs, scale_tol: float = 1e-5):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert grads and set(grads) == set(ref_grads)
    for k in grads:
        # fp32 sums in another order (TRL's padding and attention path) differ by ~1e-6 of the gradient's scale:
        # tiny elements are compared against that scale (scale_tol of it), the rest to 1e-5 of their own size.
        scale = float(ref_grads[k].abs().max())
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=scale_tol * scale, msg=k)


def first_logged_loss(trainer) -> float:
    trainer.train()
    return trainer.log_history[0]["loss"]


def assert_ga_invariant(trainer_cls, make_args, rows, folder, tmp_path):
    """2 steps at bs 4 x GA 1 and at bs 1 x GA 4: equal per-step losses and final adapters. Returns the first
    run's trainer. `make_args(out_dir, **overrides)` builds the objective's config."""
    def run(bs, ga):
        model, tok = FastLanguageModel.from_pretrained(str(folder))
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        args = make_args(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                         max_steps=2, shuffle=True)
        trainer = trainer_cls(model=model, tokenizer=tok, train_dataset=rows, args=args)
        # After the trainer took its reference (the fresh adapter, i.e. the base), so that the policy differs from
        # it, and LoRA A gets real gradients from step 1 (Adam magnifies noise in near-zero ones).
        randomize_lora_b(model)
        trainer.train()
        return trainer, {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    (ta, a), (tb, b) = run(4, 1), run(1, 4)
    la, lb = ([h["loss"] for h in t.log_history] for t in (ta, tb))
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=0)
    assert la[1] != la[0]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    return ta


@contextmanager
def restored(model):
    """The module's model as it was, after a test that moves it (shift_policy)."""
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
