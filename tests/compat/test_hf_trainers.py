"""Our decoder inside transformers.Trainer and TRL's trainers, unpatched: same per-step losses as our own trainer,
exact gradient accumulation (num_items_in_batch), checkpoints that are PEFT adapters and resume."""
import json

import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer

trl = pytest.importorskip("trl")

STEPS = 2


def _rows(tok, n=8):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    # Different lengths so that every batch carries padding and micro-batches hold different token counts.
    texts = [" ".join(words[(i + j) % 6] for j in range(2 + (i * 5) % 7)) for i in range(n)]
    return [{"input_ids": tok(t)["input_ids"] + [tok.eos_token_id]} for t in texts]


def _model(folder):
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), tok


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf_args(cls, out, bs, ga, **kw):
    # Each optimizer step consumes the whole data set (bs * ga rows), so the data order cannot matter.
    kw = {"max_steps": STEPS, "save_strategy": "no", **kw}
    return cls(output_dir=str(out), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
               learning_rate=1e-2, lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1,
               report_to=[], use_cpu=True, bf16=False, seed=0, **kw)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    from tiny import hf_model, save_hf

    return save_hf(hf_model("llama"), tmp_path_factory.mktemp("llama"), tiny_tokenizer)


@pytest.fixture(scope="module")
def ours(llama_dir, tmp_path_factory):
    """Our own SFTTrainer's per-step losses and final adapter on the same rows and settings."""
    return _our_sft(llama_dir, tmp_path_factory.mktemp("ours"), 8, 1)


def _our_sft(llama_dir, out, bs, ga, **cfg):
    """(per-step losses, final trainable tensors, log history, evaluate() on EVAL_ROWS) of our SFTTrainer, the
    data in order."""
    model, tok = _model(llama_dir)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     learning_rate=1e-2, lr_scheduler_type="constant", max_steps=STEPS, optim="adamw_torch",
                     shuffle=False, per_device_eval_batch_size=2, **cfg)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(tok), args=args)
    trainer.train()
    return ([h["loss"] for h in trainer.log_history if "loss" in h], _trainable(model), trainer.log_history,
            trainer.evaluate(_rows(tok, EVAL_ROWS)))


def _trl_sft(llama_dir, out, bs, ga, **cfg):
    from datasets import Dataset

    model, tok = _model(llama_dir)
    args = _hf_args(trl.SFTConfig, out, bs, ga, gradient_checkpointing=False, train_sampling_strategy="sequential",
                    per_device_eval_batch_size=2, **cfg)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(tok)),
                             processing_class=tok)
    trainer.train()
    return ([h["loss"] for h in trainer.state.log_history if "loss" in h], _trainable(model),
            trainer.state.log_history, trainer.evaluate(Dataset.from_list(_rows(tok, EVAL_ROWS))))


TOKEN_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")
EVAL_ROWS = 5  # batches of 2, 2 and 1 rows


@pytest.mark.parametrize("bs,ga", [(8, 1), (2, 4)])
def test_trl_sft_trainer_equals_ours(llama_dir, ours, tmp_path, bs, ga):
    """Per-step losses and the final adapter, TRL's token metrics (entropy and mean_token_accuracy: the mean of the
    micro-batches' means over their target tokens; num_tokens seen) in training and in evaluate() (eval_ ones)."""
    losses, params, history, evaluated = _trl_sft(llama_dir, tmp_path / "trl", bs, ga)
    our_losses, our_params, our_history, our_eval = ours if ga == 1 else _our_sft(llama_dir, tmp_path / "o", bs, ga)
    theirs = [h for h in history if "loss" in h]
    mine = [h for h in our_history if "loss" in h]
    assert any(h["mean_token_accuracy"] > 0 for h in mine)
    for key in TOKEN_METRICS:
        assert [h[key] for h in mine] == pytest.approx([h[key] for h in theirs], rel=1e-5), key
        assert our_eval[f"eval_{key}"] == pytest.approx(evaluated[f"eval_{key}"], rel=1e-5), key
    assert len(losses) == STEPS and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(our_losses), rtol=1e-5, atol=0)
    for n, p in our_params.items():
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-6, msg=n)


def test_dft_loss_equals_trl(llama_dir, tmp_path):
    """loss_type="dft" (Dynamic Fine-Tuning): per-step losses, the final adapter and the eval loss equal
    trl.SFTTrainer's, with two micro-batches a step; and they differ from the plain cross-entropy's."""
    losses, params, _, evaluated = _trl_sft(llama_dir, tmp_path / "trl", 4, 2, loss_type="dft")
    our_losses, our_params, _, our_eval = _our_sft(llama_dir, tmp_path / "o", 4, 2, loss_type="dft")
    plain = _our_sft(llama_dir, tmp_path / "nll", 4, 2)[0]
    assert losses[0] < plain[0] * 0.5
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(losses), rtol=1e-5, atol=0)
    for n, p in our_params.items():
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-6, msg=n)
    assert our_eval["eval_loss"] > 0 and our_eval["eval_entropy"] == pytest.approx(evaluated["eval_entropy"], rel=1e-5)


def _collate(pad_id):
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return collate


def _hf_trainer(llama_dir, out, bs, ga, **kw):
    from transformers import Trainer, TrainingArguments

    model, tok = _model(llama_dir)
    trainer = Trainer(model=model, args=_hf_args(TrainingArguments, out, bs, ga, **kw), train_dataset=_rows(tok),
                      data_collator=_collate(tok.pad_token_id))
    return trainer, model


def test_transformers_trainer_gradient_accumulation_is_exact(llama_dir, ours, tmp_path):
    results = []
    for bs, ga in [(8, 1), (2, 4)]:
        trainer, model = _hf_trainer(llama_dir, tmp_path / f"{bs}x{ga}", bs, ga)
        trainer.train()
        results.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], _trainable(model)))
    (l1, p1), (l4, p4) = results
    torch.testing.assert_close(torch.tensor(l4), torch.tensor(l1), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(ours[0]), rtol=1e-5, atol=0)
    for n in p1:
        torch.testing.assert_close(p4[n], p1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_transformers_trainer_checkpoint_is_a_peft_adapter_and_resumes(llama_dir, tmp_path):
    from peft import PeftModel
    from tiny import hf_model

    full, model = _hf_trainer(llama_dir, tmp_path / "full", 8, 1, max_steps=3)
    full.train()
    trainer, _ = _hf_trainer(llama_dir, tmp_path / "run", 8, 1, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"
    PeftModel.from_pretrained(hf_model("llama"), str(ckpt))  # PEFT loads it as it is

    resumed, model2 = _hf_trainer(llama_dir, tmp_path / "run", 8, 1, save_strategy="steps", save_steps=2,
                                  max_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = _trainable(model), _trainable(model2)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-7, msg=n)


def test_forward_follows_transformers_contract(llama_dir):
    model, _ = _model(llama_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, labels=ids, return_logits=True)
    assert out["loss"] is out.loss and out[0] is out.loss
    assert model(input_ids=ids, labels=ids, return_dict=False)[0] == out.loss
    assert model(input_ids=ids, logits_to_keep=1, use_cache=False).logits.shape == (1, 1, 300)
    with pytest.raises(TypeError, match="label"):
        model(input_ids=ids, label=ids)  # a typo is an error, not a silent no-loss forward
    assert model.config.get_text_config().model_type == "llama"
    assert model.get_input_embeddings() is model.model.embed_tokens


def test_eval_mode_forward_answers_as_transformers_models(llama_dir):
    """In eval mode with labels (transformers' Trainer evaluation) both model kinds return the loss and the logits
    and nothing else, so prediction_step's predictions are the logits; training mode and fasttune's own callers
    (return_logits given) keep loss_sum / target_count, without logits unless asked."""
    ids = torch.tensor([[5, 6, 7, 8]])
    for fast in (True, False):
        with pytest.warns() if not fast else _no_warning():
            model, _ = FastLanguageModel.from_pretrained(str(llama_dir), fast=fast)
        model.eval()
        out = model(input_ids=ids, labels=ids)
        assert list(out.keys()) == ["loss", "logits"] and out.logits.shape == (1, 4, 300)
        own = model(input_ids=ids, labels=ids, return_logits=False)
        assert own.logits is None and int(own.target_count) == 3 and torch.equal(own.loss, out.loss)
        model.train()
        assert model(input_ids=ids, labels=ids).logits is None


def test_trl_padding_free_packing_equals_padded_batches(llama_dir, tmp_path):
    """TRL's packing hands the model one row of documents with position_ids restarting per document and
    cu_seq_lens/seq_idx: each document must attend only to itself, as in a padded batch."""
    from datasets import Dataset

    losses = {}
    for packing in (False, True):
        model, tok = _model(llama_dir)
        rows = [{"text": "alpha beta gamma " * (1 + i % 3)} for i in range(8)]
        args = _hf_args(trl.SFTConfig, tmp_path / str(packing), 8, 1, max_steps=1, packing=packing, max_length=256,
                        gradient_checkpointing=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        if packing:
            batch = next(iter(trainer.get_train_dataloader()))
            assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch
        trainer.train()
        losses[packing] = trainer.state.log_history[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_padding_free_inputs_attend_within_documents(llama_dir):
    model, _ = _model(llama_dir)
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    row = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
    for kw in ({"position_ids": positions}, {"position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu},
               {"position_ids": positions, "seq_idx": torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.int32)}):
        torch.testing.assert_close(model(input_ids=row, **kw).logits, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="padding-free"):
        model(input_ids=row.expand(2, -1), cu_seq_lens_q=cu)


def test_all_ones_attention_mask_is_plain_causal(llama_dir):
    model, _ = _model(llama_dir)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                               model(input_ids=ids).logits, rtol=0, atol=0)


def test_trainer_facing_methods(llama_dir):
    from fasttune.errors import ConfigError

    model, _ = _model(llama_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ConfigError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    model.gradient_checkpointing = "offload"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.gradient_checkpointing == "offload"  # an explicit offload choice survives the trainer's call
    model.gradient_checkpointing_disable()
    assert model.gradient_checkpointing is False and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="safe_serialisation"):
        model.save_pretrained("unused", safe_serialisation=True)


def test_fallback_model_in_trl_sft_trainer_equals_our_decoder(llama_dir, tmp_path):
    """The transformers+PEFT fallback (fast=False) is a citizen of TRL's trainer too: same per-step losses."""
    from datasets import Dataset

    def losses(fast):
        model, tok = FastLanguageModel.from_pretrained(str(llama_dir), fast=fast)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        rows = [{"text": "alpha beta gamma " * (1 + i % 3)} for i in range(8)]
        args = _hf_args(trl.SFTConfig, tmp_path / str(fast), 8, 1, max_steps=2, max_length=256,
                        gradient_checkpointing=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    with pytest.warns(UserWarning, match="transformers"):
        slow = losses(False)
    torch.testing.assert_close(torch.tensor(slow), torch.tensor(losses(True)), rtol=1e-5, atol=0)


def test_both_model_kinds_implement_the_interface(llama_dir):
    from fasttune.models.interface import FineTunableLM

    for fast in (True, False):
        with pytest.warns() if not fast else _no_warning():
            model, _ = FastLanguageModel.from_pretrained(str(llama_dir), fast=fast)
        assert isinstance(model, FineTunableLM), type(model)
        assert model.lora_settings is None and model.config.model_type == model.arch.model_type == "llama"
        assert model.embedding_param_names == ()  # nothing trainable yet


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_trl_dpo_trainer_equals_our_dpo_trainer(llama_dir, tmp_path):
    from datasets import Dataset

    from fasttune import DPOConfig, DPOTrainer

    rows = [{"prompt": f"question {i}: ", "chosen": f"good answer {i}", "rejected": f"bad {i * 7}"} for i in range(8)]
    model, tok = _model(llama_dir)
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                      args=DPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=8,
                                     gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=1e-2,
                                     lr_scheduler_type="constant", optim="adamw_torch"))
    ours.train()
    expected = torch.tensor([h["loss"] for h in ours.log_history if "loss" in h])
    for bs, ga in [(8, 1), (4, 2)]:
        model, tok = _model(llama_dir)
        args = _hf_args(trl.DPOConfig, tmp_path / f"trl{ga}", bs, ga, gradient_checkpointing=False)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
        assert losses[0] == pytest.approx(0.693147, abs=1e-6) and losses[-1] < losses[0]
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_prompt_completion_rows_equal_trl(llama_dir, tmp_path, completion_only_loss, conversational):
    """prompt/completion rows, as text or as chat messages (rendered with the chat template): the same tokens as
    trl.SFTTrainer's, and its loss mask (TRL's completion_only_loss: the default None trains on the completion only,
    False on the whole row)."""
    from datasets import Dataset

    rows = [{"prompt": f"question {i}: what is {i} + {i}?", "completion": f" it is {2 * i}."} for i in range(4)]
    if conversational:
        rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in rows]
    model, tok = _model(llama_dir)
    ours = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=SFTConfig(
        output_dir=str(tmp_path / "o"), max_steps=1, completion_only_loss=completion_only_loss))
    theirs = trl.SFTTrainer(model=_model(llama_dir)[0], train_dataset=Dataset.from_list(rows), processing_class=tok,
                            args=_hf_args(trl.SFTConfig, tmp_path / "t", 2, 1, completion_only_loss=completion_only_loss))
    for mine, want in zip(ours.train_examples, theirs.train_dataset):
        assert mine["input_ids"] == want["input_ids"] and mine["labels"] == want["labels"]
        assert (-100 in mine["labels"]) == (completion_only_loss is None)
