"""BEMA (train/bema.py): TRL's BEMACallback handed to our trainer runs ours with its settings; the average equals
TRL's formulas (its own _ema_beta / _bema_alpha) over the weights a callback recorded after each step, the saved
bema/ adapter holds it, and the trained weights are left as they were."""
import pytest
import torch
from transformers import TrainerCallback

from fasttune import BEMACallback, FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

ROWS = [{"text": "word " * (4 + i % 5)} for i in range(8)]


class Weights(TrainerCallback):
    def __init__(self):
        self.after = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def _train(folder, tmp_path, bema, steps=5):
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    weights = Weights()
    trainer = SFTTrainer(model, tok, train_dataset=ROWS, callbacks=[bema, weights], args=SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2, learning_rate=5e-2,
        save_strategy="no", report_to="none"))
    trainer.train()
    ours = next(cb for cb in trainer.callbacks.callbacks if isinstance(cb, BEMACallback))
    return model, tok, trainer, ours, weights


def test_trls_callback_runs_ours_with_trls_formulas(tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    theirs = trl.BEMACallback(update_freq=2, update_after=1, lag=3, ema_power=0.6, bias_power=0.3, multiplier=1.5)
    model, tok, trainer, ours, w = _train(tiny_model_dir("llama"), tmp_path, theirs)
    assert not isinstance(ours, trl.BEMACallback) and ours.lag == 3 and ours.update_freq == 2
    # snapshots at step 1; updates at steps 3 and 5
    theta0 = w.after[0]
    ema = {n: t.clone() for n, t in theta0.items()}
    for step in (3, 5):
        beta, alpha = theirs._ema_beta(step), theirs._bema_alpha(step)
        ema = {n: (1 - beta) * ema[n] + beta * w.after[step - 1][n] for n in ema}
        want = {n: ema[n] + alpha * (w.after[step - 1][n] - theta0[n]) for n in ema}
    assert any((want[n] - w.after[-1][n]).abs().max() > 1e-4 for n in want)  # the average is not the last weights
    for n in want:
        torch.testing.assert_close(ours.weights[n], want[n], rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():  # training's own weights are back after the save
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), w.after[-1][n], rtol=0, atol=0)
    # bema/ is a PEFT adapter holding the average: loaded, it gives the logits of the model with the average in
    saved, _ = FastLanguageModel.from_pretrained(str(tmp_path / "out" / "bema"), dtype="float32")
    ids = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(want[n])
        torch.testing.assert_close(saved(ids, return_logits=True).logits, model(ids, return_logits=True).logits,
                                   rtol=1e-5, atol=1e-5)


def test_no_update_before_the_first_keeps_the_starting_weights(tiny_model_dir, tmp_path):
    """update_freq past the run: nothing averaged, bema/ holds the weights training started from (as TRL's copy)."""
    model, tok, trainer, ours, w = _train(tiny_model_dir("llama"), tmp_path, BEMACallback(update_freq=400), steps=2)
    for n in w.start:
        torch.testing.assert_close(ours.weights[n], w.start[n], rtol=0, atol=0)
    assert (tmp_path / "out" / "bema" / "adapter_model.safetensors").exists()


def test_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"update_freq=0\) is invalid"):
        BEMACallback(update_freq=0)
    exp = pytest.importorskip("trl.experimental.bema_for_ref_model")
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    sft = SFTTrainer(FastLanguageModel.get_peft_model(model, r=4), tok, train_dataset=ROWS,
                     callbacks=[exp.BEMACallback(update_ref_model=True)],
                     args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none"))
    with pytest.raises(ConfigError, match="update_ref_model=True.*SFTTrainer takes no reference passes"):
        sft.train()


@pytest.mark.parametrize("lora", [False, True])
def test_bema_reference_model(lora, tiny_model_dir, tmp_path):
    """TRL's experimental update_ref_model: after every 2nd step the reference takes the average. Full fine-tuning:
    four steps' DPO losses and rewards equal TRL's experimental DPOTrainer with the same callback (TRL loads the
    average into its reference model). LoRA: the reference adapter is the average after training."""
    trl = pytest.importorskip("trl")
    exp = pytest.importorskip("trl.experimental.bema_for_ref_model")
    from datasets import Dataset
    from preference_oracle import pair_rows, trl_args
    from transformers import AutoModelForCausalLM

    from fasttune import DPOConfig, DPOTrainer

    folder, rows = tiny_model_dir("llama"), pair_rows(4)
    settings = dict(update_freq=1, lag=2, update_ref_model=True, ref_model_update_freq=2, ref_model_update_after=0)
    cfg = dict(max_steps=4, learning_rate=1e-3, beta=0.5, logging_steps=1)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32", full_finetuning=not lora)
    if lora:
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, callbacks=[exp.BEMACallback(**settings)],
                      args=DPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=4, shuffle=False,
                                     save_strategy="no", **cfg))
    ours.train()
    bema = next(cb for cb in ours.callbacks.callbacks if isinstance(cb, BEMACallback))
    for n, w in bema.weights.items():  # the last update (step 4) is the reference
        torch.testing.assert_close(ours.reference.saved[n], w)
    if lora:
        return
    theirs = exp.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                            args=trl_args(trl.DPOConfig, tmp_path, **cfg), train_dataset=Dataset.from_list(rows),
                            processing_class=tok, callbacks=[exp.BEMACallback(**settings)])
    theirs.train()
    got = [h for h in ours.log_history if "loss" in h]
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == 4
    for key in ("loss", "rewards/chosen", "rewards/margins"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-4, abs=1e-6), key


def test_full_finetuning_saves_a_transformers_checkpoint_of_the_average(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype="float32",
                                                   full_finetuning=True)
    bema = BEMACallback(update_freq=1, lag=2)
    SFTTrainer(model, tok, train_dataset=ROWS, callbacks=[bema], args=SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        save_strategy="no", report_to="none")).train()
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "bema").named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    assert name in bema.weights and not torch.equal(bema.weights[name], dict(model.named_parameters())[name])
    torch.testing.assert_close(saved[name], bema.weights[name])
