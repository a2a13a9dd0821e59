"""Full fine-tuning (every weight trainable) against a plain transformers training loop on the same batches."""
import torch
from peft_oracle import reference_sft_losses
from tiny import hf_model

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer


def _rows(n=16):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return [{"text": " ".join(words[(i + j) % 6] for j in range(2 + (i * 7) % 9))} for i in range(n)]


def test_20_steps_equal_a_transformers_loop(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model, tok = FastLanguageModel.from_pretrained(str(folder), full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=1e-3, lr_scheduler_type="constant", max_steps=20, max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    batches = trainer.step_batches(0, 0)  # the very batches the trainer will see, for the reference loop
    trainer.train()
    ours = [h["loss"] for h in trainer.log_history if "loss" in h]

    ref = hf_model("llama", seed=0).train()
    theirs = reference_sft_losses(ref, batches, 20, lr=1e-3)
    assert len(ours) == 20 and ours[-1] < ours[0] - 1.0
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=0)
    # ...and the trained weights agree too.
    mine = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=1e-3, atol=1e-5, msg=name)


def test_embedding_learning_rate_applies_to_full_finetuning(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path / "o"), learning_rate=1e-3, embedding_learning_rate=0.0, max_steps=2,
                     per_device_train_batch_size=4, gradient_accumulation_steps=1)
    SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args).train()
    after = dict(model.named_parameters())
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert all(not torch.equal(after[n], before[n]) for n in before if n not in frozen)
