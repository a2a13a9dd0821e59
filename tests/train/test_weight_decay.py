"""Weight decay goes where transformers' Trainer puts it: matrices and embeddings, never biases or norm weights
(Trainer.get_decay_parameter_names), for full fine-tuning, LoRA (+ modules_to_save) and the transformers fallback."""
import warnings

import pytest
import torch
from tiny import FAMILIES, hf_model

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.train.optim import build_optimizer, decay_parameter_names


def _trainer_decay_names(model) -> set[str]:
    """transformers' own rule, called as Trainer calls it on the model it trains."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def _rows(n=4, length=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 256, (length,), generator=g).tolist()} for _ in range(n)]


def test_one_step_with_weight_decay_equals_transformers_trainer(tiny_model_dir, tmp_path):
    """Tiny Qwen2 (q/k/v biases, 26 tensors): one full fine-tuning step with weight_decay=0.5."""
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    folder = tiny_model_dir("qwen2")
    rows, lr, wd = _rows(), 1e-2, 0.5
    model, tok = FastLanguageModel.from_pretrained(str(folder), full_finetuning=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     learning_rate=lr, weight_decay=wd, lr_scheduler_type="constant", max_steps=1)
    SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args).train()

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows])
    targs = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=1,
                              learning_rate=lr, weight_decay=wd, lr_scheduler_type="constant", report_to=[],
                              save_strategy="no", use_cpu=True, max_grad_norm=1.0)
    trainer = Trainer(model=ref, args=targs, train_dataset=ds)
    trainer.train()
    decayed = _trainer_decay_names(ref)
    theirs = dict(ref.named_parameters())
    ours = dict(model.named_parameters())
    assert len(ours) == 26 and len(decayed & set(ours)) == 15  # 14 matrices + the (tied) embedding
    assert decay_parameter_names(model) == decayed & set(ours)
    for name, p in theirs.items():
        # Adam's first step is about lr * sign(grad): an entry whose gradient is near zero may move by anything up
        # to lr either way, and which entries do depends on the CPU's GEMM kernels (1.1e-4 on one machine). A
        # misplaced decay (lr * wd * w, ~1e-4 here) would move nearly every entry: at most a few may differ.
        off = (ours[name] - p).abs()
        assert int((off > 2e-5).sum()) <= max(2, off.numel() // 1000) and off.max() <= 2 * lr, name
    # Decaying the final norm would have moved it by lr * wd * w (the 1.19494 instead of 1.20094).
    assert (before["model.norm.weight"] * lr * wd).abs().min() > 100 * 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_decayed_names_follow_transformers_rule_for_every_family(family, tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), full_finetuning=True)
    ref = hf_model(family)
    hf_name = model.checkpoint_name  # (Nemotron-H's embeddings and final norm have their own names)
    ours = {hf_name(n) for n, _ in model.named_parameters()}
    assert {hf_name(n) for n in decay_parameter_names(model)} == _trainer_decay_names(ref) & ours
    # (transformers' rule misses Nemotron-H's final norm, norm_f: decayed there as by transformers' Trainer)
    assert not any(("norm" in n or "bias" in n) and hf_name(n) != "model.norm_f.weight"
                   for n in decay_parameter_names(model))


def test_lora_and_modules_to_save_are_decayed_as_peft_under_trainer(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")))
    model = FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["embed_tokens", "lm_head"])
    twin = get_peft_model(hf_model("qwen2"), LoraConfig(r=4, target_modules=model.lora_settings.target_modules,
                                                        modules_to_save=["embed_tokens", "lm_head"]))
    trainable_twin = {n for n, p in twin.named_parameters() if p.requires_grad}
    # PEFT under Trainer: every trainable tensor (LoRA A/B, the embedding copies) is decayed, and so are ours.
    assert trainable_twin <= _trainer_decay_names(twin)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(trainable_twin) and trainable <= decay_parameter_names(model)
    # embedding_learning_rate keeps its own group; every trainable tensor sits in a decayed group.
    args = SFTConfig(output_dir=str(tmp_path), learning_rate=1e-3, embedding_learning_rate=1e-5, weight_decay=0.1)
    groups = build_optimizer(model, args).param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1e-3, 0.1, len(trainable) - 2), (1e-5, 0.1, 2)]


def test_norms_trained_by_the_fallback_are_not_decayed(tmp_path, tiny_tokenizer):
    """GPT-2 through transformers: its norms are nn.LayerNorm modules named ln_1/ln_2/ln_f (no 'norm' in the
    name), which Trainer skips by module type."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=300,
                                    bos_token_id=1, eos_token_id=256, pad_token_id=256))
    hf.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "gpt2"), full_finetuning=True)
    prefix = "hf_model."
    theirs = {prefix + n for n in _trainer_decay_names(hf)} & {n for n, _ in model.named_parameters()}
    assert decay_parameter_names(model) == theirs
    assert "hf_model.transformer.ln_f.weight" not in theirs and "hf_model.transformer.h.0.attn.c_attn.weight" in theirs
    args = SFTConfig(output_dir=str(tmp_path / "o"), learning_rate=1e-3, weight_decay=0.1)
    groups = build_optimizer(model, args).param_groups
    decayed = sum(len(g["params"]) for g in groups if g["weight_decay"])
    assert decayed == len(theirs)
