"""One SFT run two ways, for tests that compare fasttune's SFTTrainer with trl.SFTTrainer on the same model: tiny
text rows of different lengths (every batch padded), a LoRA on our model, both trainers with the same settings."""
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer


def rows(tok, n=6):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return [{"input_ids": tok(" ".join(words[(i + j) % 6] for j in range(2 + (i * 5) % 7)))["input_ids"]
             + [tok.eos_token_id]} for i in range(n)]


def lora_model(folder, **load):
    """Our model (or with fast=False the transformers fallback) from `folder` in fp32, with a r=4 LoRA."""
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, **load)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), tok


def common(out, bs, ga, steps):
    return dict(output_dir=str(out), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                learning_rate=1e-2, max_steps=steps, lr_scheduler_type="constant", optim="adamw_torch",
                per_device_eval_batch_size=8)  # one eval batch: transformers weights batch means by rows


def our_sft(folder, out, bs=6, ga=1, steps=3, callbacks=None, load=None, **cfg):
    """(per-step losses, eval loss on the training rows, the trainer) of fasttune's SFTTrainer, data in order;
    load: from_pretrained's keywords (fast=False)."""
    model, tok = lora_model(folder, **(load or {}))
    args = SFTConfig(**common(out, bs, ga, steps), shuffle=False, **cfg)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows(tok), args=args, callbacks=callbacks)
    trainer.train()
    return [h["loss"] for h in trainer.log_history if "loss" in h], trainer.evaluate(rows(tok))["eval_loss"], trainer


def trl_sft(folder, out, bs=6, ga=1, steps=3, callbacks=None, load=None, **cfg):
    """The same with trl.SFTTrainer (our model inside it, unpatched), data in order."""
    import trl
    from datasets import Dataset

    model, tok = lora_model(folder, **(load or {}))
    args = trl.SFTConfig(**common(out, bs, ga, steps), logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                         seed=0, save_strategy="no", gradient_checkpointing=False,
                         train_sampling_strategy="sequential", **cfg)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows(tok)),
                             processing_class=tok, callbacks=callbacks)
    trainer.train()
    return ([h["loss"] for h in trainer.state.log_history if "loss" in h],
            trainer.evaluate(Dataset.from_list(rows(tok)))["eval_loss"], trainer)
