"""DPO against TRL 1.16's DPOTrainer (loss and gradients on one batch), gradient accumulation, reference options."""
import pytest
import torch
from preference_oracle import (assert_ga_invariant, assert_same_step, first_logged_loss, lora_pair, our_step,
                               pair_rows, shift_policy, trl_args, trl_step)

from fasttune import DPOConfig, DPOTrainer, FastLanguageModel
from fasttune.errors import ConfigError


def _args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1, "shuffle": False,
          "learning_rate": 1e-2, **kw}
    return DPOConfig(output_dir=str(tmp_path / "out"), **kw)


@pytest.mark.parametrize("loss_type,family", [("sigmoid", "llama"), ("ipo", "llama"), ("hinge", "llama"),
                                              ("sigmoid", "qwen3_5_text")])
def test_loss_and_grads_equal_trl(loss_type, family, tiny_model_dir, tmp_path):
    """Also on Qwen3.5 (gated DeltaNet layers, padded pairs) against TRL on transformers + PEFT."""
    import trl
    from datasets import Dataset

    model, tok, twin = lora_pair(tiny_model_dir(family), tmp_path, family)
    rows = pair_rows(4)
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, loss_type=loss_type,
                                                                                  beta=0.5))
    theirs = trl.DPOTrainer(model=twin, args=trl_args(trl.DPOConfig, tmp_path, beta=0.5, loss_type=[loss_type]),
                            train_dataset=Dataset.from_list(rows), processing_class=tok)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert [[ex[k] for k in keys] for ex in ours.train_examples] == [[t[k] for k in keys] for t in theirs.train_dataset]
    shift_policy(model, twin)
    ref = trl_step(theirs, twin, theirs.data_collator([{k: ex[k] for k in keys} for ex in ours.train_examples]))
    assert_same_step(our_step(ours), ref)
    assert first_logged_loss(ours) == pytest.approx(float(ref[0]), rel=1e-5)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(ours.log_history[0])


def _trl_twins_step(tiny_model_dir, tmp_path, cfg):
    """Our DPOTrainer and TRL's on twin LoRA models (beta 0.5, `cfg`), the policy moved alike after both took their
    reference; returns ((our model, tokenizer, rows), ours, theirs, TRL's (loss, grads) on our first batch)."""
    import trl
    from datasets import Dataset

    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path, "llama")
    rows = pair_rows(4)
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, beta=0.5, **cfg))
    theirs = trl.DPOTrainer(model=twin, args=trl_args(trl.DPOConfig, tmp_path, beta=0.5, **cfg),
                            train_dataset=Dataset.from_list(rows), processing_class=tok)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    shift_policy(model, twin)
    ref = trl_step(theirs, twin, theirs.data_collator([{k: ex[k] for k in keys} for ex in ours.train_examples]))
    return (model, tok, rows), ours, theirs, ref


@pytest.mark.parametrize("cfg", [
    dict(loss_type=["exo_pair", "robust", "discopop", "sigmoid_norm"], loss_weights=[1.0, 0.5, 0.2, 0.7],
         label_smoothing=0.1, discopop_tau=0.1, f_divergence_type="js_divergence"),
    dict(loss_type=["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired", "sft"],
         loss_weights=[1.0, 0.4, 0.3, 0.6, 0.5, 0.7, 0.3, 0.2], label_smoothing=0.1),
    dict(loss_type=["sigmoid", "ipo", "hinge", "sft"], loss_weights=[0.5, 0.25, 1.0, 0.1],
         f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl")],
    ids=["smoothed_js", "pairwise", "alpha_divergence", "forward_kl"])
def test_other_losses_and_weighted_sums_equal_trl(cfg, tiny_model_dir, tmp_path):
    """TRL 1.16's other DPO loss types, as a weighted list of them (TRL's loss_weights), with f-divergence scores:
    loss and LoRA gradients of a batch equal TRL's."""
    _, ours, _, ref = _trl_twins_step(tiny_model_dir, tmp_path, cfg)
    # (forward KL's scores 1 - exp(-r) scale the log-ratios' fp32 rounding by exp(-r): 1.5e-5 of the scale seen)
    assert_same_step(our_step(ours), ref, scale_tol=5e-5 if cfg.get("f_divergence_type") == "forward_kl" else 1e-5)


def test_loss_settings_are_checked(tmp_path):
    for kw, match in ((dict(loss_type="simpo"), "loss_type='simpo' is not supported"),
                      (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 values"),
                      (dict(label_smoothing=0.5), "label_smoothing=0.5"),
                      (dict(loss_type="exo_pair"), "exo_pair' needs label_smoothing"),
                      (dict(f_divergence_type="tv"), "f_divergence_type='tv'"),
                      (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), r"not to \['bco_pair'\]")):
        with pytest.raises(ConfigError, match=match):
            _args(tmp_path, **kw)
    assert _args(tmp_path, loss_type="sigmoid,sft", loss_weights="0.8,0.2").loss_type == ["sigmoid", "sft"]


def test_gradient_accumulation_is_invariant(tiny_model_dir, tmp_path):
    assert_ga_invariant(DPOTrainer, _args, pair_rows(8), tiny_model_dir("llama"), tmp_path)


def test_precomputed_reference_equals_reference_pass(tiny_model_dir, tmp_path):
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    live = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(4), args=_args(tmp_path))
    pre = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(4),
                     args=_args(tmp_path, precompute_ref_log_probs=True))
    assert "ref_chosen_logps" in pre.train_examples[0]
    rows = [{**r, "ref_chosen_logps": ex["ref_chosen_logps"], "ref_rejected_logps": ex["ref_rejected_logps"]}
            for r, ex in zip(pair_rows(4), pre.train_examples)]
    given = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path))
    want = our_step(live)
    for t in (pre, given):
        (loss, grads) = our_step(t)
        torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=0)
        for k in grads:
            torch.testing.assert_close(grads[k], want[1][k], rtol=1e-5, atol=1e-8)


def test_eval_loss_is_the_objective(tiny_model_dir, tmp_path):
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(4), eval_dataset=pair_rows(4),
                         args=_args(tmp_path, per_device_eval_batch_size=4))
    loss, _ = our_step(trainer)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert "eval_rewards/accuracies" in metrics


def test_full_finetuning_keeps_a_reference_copy_or_precomputes(tiny_model_dir, tmp_path):
    """Full fine-tuning: the reference is a copy of every weight (its curve against TRL's: test_reference_sync.py),
    or with precompute_ref_log_probs no copy at all; both start at ln 2 (policy == reference)."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    copy = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(2), args=_args(tmp_path))
    assert copy.reference.is_copy and len(copy.reference.saved) == len(list(model.parameters()))
    trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(2),
                         args=_args(tmp_path, precompute_ref_log_probs=True))
    assert trainer.reference is None
    for t in (copy, trainer):
        assert our_step(t, 2)[0] == pytest.approx(0.6931472, rel=1e-5)  # policy == reference before training


@pytest.mark.parametrize("kw, match", [({"beta": 0}, "beta"), ({"loss_type": "kto"}, "loss_type"),
                                       ({"max_prompt_length": 0}, "max_prompt_length")])
def test_bad_config(kw, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _args(tmp_path, **kw)


def test_transformers_fallback_equals_our_decoder(tiny_model_dir, tmp_path):
    """On the fallback path the reference is a frozen copy of the PEFT adapter as loaded; same loss and gradients."""
    model, tok, _ = lora_pair(tiny_model_dir("llama"), tmp_path)
    fallback, _ = FastLanguageModel.from_pretrained(str(tmp_path / "init"), fast=False)
    name = lambda k: k.removeprefix("hf_model.base_model.model.").replace(".default.weight", "")  # noqa: E731
    trainers = [DPOTrainer(model=m, tokenizer=tok, train_dataset=pair_rows(4), args=_args(tmp_path))
                for m in (model, fallback)]
    # The reference is the adapter as handed over (a frozen copy); move both policies away from it the same way.
    g = torch.Generator().manual_seed(3)
    deltas = {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for m in (model, fallback):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.add_(deltas[name(n)])
    (loss, grads), (fb_loss, fb_grads) = (our_step(t) for t in trainers)
    fb_grads = {name(k): g for k, g in fb_grads.items()}
    assert loss != pytest.approx(0.6931472, rel=1e-3)  # the adapter matters: policy != reference
    torch.testing.assert_close(fb_loss, loss, rtol=1e-5, atol=1e-7)
    assert set(fb_grads) == set(grads)
    for k in grads:
        torch.testing.assert_close(fb_grads[k], grads[k], rtol=1e-4, atol=1e-7, msg=k)


def _implicit_rows():
    """chosen/rejected that repeat the conversation (TRL's implicit prompt), as message lists and as strings."""
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    chat = [{"chosen": [u("hi"), a("yes")], "rejected": [u("hi"), a("no!")]},
            {"chosen": [{"role": "system", "content": "brief"}, u("2+2?"), a("4"), u("and 3+3?"), a("6")],
             "rejected": [{"role": "system", "content": "brief"}, u("2+2?"), a("4"), u("and 3+3?"), a("7, I think")]}]
    text = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"},
            {"chosen": "Say hi. hello there", "rejected": "Say hi. go away"}]
    return chat, text


@pytest.mark.parametrize("kind", ["messages", "strings"])
def test_implicit_prompt_gives_trls_tokens(kind, tiny_model_dir, tmp_path):
    """Rows with only chosen/rejected: the shared prefix is the prompt, tokenized as TRL 1.16's DPOTrainer does."""
    import trl
    from datasets import Dataset

    rows = _implicit_rows()[kind == "strings"]
    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path))
    theirs = trl.DPOTrainer(model=twin, args=trl_args(trl.DPOConfig, tmp_path), train_dataset=Dataset.from_list(rows),
                            processing_class=tok)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    got = [[ex[k] for k in keys] for ex in ours.train_examples]
    assert got == [[t[k] for k in keys] for t in theirs.train_dataset]
    if kind == "messages":  # the whole shared conversation is the prompt, the replies the completions
        assert tok.decode(got[1][1]).startswith("6") and tok.decode(got[1][2]).startswith("7, I think")
        assert "and 3+3?" in tok.decode(got[1][0])
    our_step(ours, 2)  # trains


def test_implicit_prompt_kto_and_errors(tiny_model_dir, tmp_path):
    import trl
    from datasets import Dataset

    from fasttune import KTOConfig, KTOTrainer
    from fasttune.errors import DataError

    chat, _ = _implicit_rows()
    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    ours = KTOTrainer(model=model, tokenizer=tok, train_dataset=chat,
                      args=KTOConfig(output_dir=str(tmp_path / "k"), per_device_train_batch_size=2))
    theirs = trl.KTOTrainer(model=twin, train_dataset=Dataset.from_list(chat), processing_class=tok,
                            args=trl_args(trl.KTOConfig, tmp_path))
    keys = ("prompt_ids", "completion_ids", "label")
    # the same rows (TRL lists all chosen rows first, we keep each pair's two rows together)
    assert sorted([ex[k] for k in keys] for ex in ours.train_examples) == sorted([t[k] for k in keys]
                                                                                 for t in theirs.train_dataset)
    bad = [{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}]
    with pytest.raises(DataError, match="share no leading message.*'prompt'"):
        DPOTrainer(model=model, tokenizer=tok, train_dataset=bad, args=_args(tmp_path))
    with pytest.raises(DataError, match="both to be message lists or both strings"):
        DPOTrainer(model=model, tokenizer=tok, train_dataset=[{"chosen": "a b", "rejected": chat[0]["rejected"]}],
                   args=_args(tmp_path))


def test_reference_is_the_loaded_adapter_as_in_trl(tiny_model_dir, tmp_path):
    """DPO started from a saved (SFT) adapter that is not the identity: the reference is that adapter, as TRL 1.16
    copies it ("ref"); step 0 has loss ln 2 and rewards 0, and the next steps' losses are TRL's. Precomputed
    reference log-probs give the same numbers."""
    import math

    import trl
    from datasets import Dataset
    from peft_oracle import peft_twin

    lora_pair(tiny_model_dir("llama"), tmp_path)  # saves the adapter (random LoRA B) to tmp_path / "init"
    rows, steps = pair_rows(4), 3
    runs = {}
    for pre in (False, True):
        model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "init"))
        trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                             args=_args(tmp_path / str(pre), max_steps=steps, precompute_ref_log_probs=pre))
        trainer.train()
        runs[pre] = trainer.log_history
    first = runs[False][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    twin = peft_twin("llama", tmp_path / "init")
    theirs = trl.DPOTrainer(model=twin, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            args=trl_args(trl.DPOConfig, tmp_path, max_steps=steps, learning_rate=1e-2,
                                          logging_steps=1))
    theirs.train()
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert want[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the oracle: ln 2 at step 0
    assert want[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    for pre in (False, True):
        got = [h["loss"] for h in runs[pre]]
        assert got == pytest.approx([h["loss"] for h in want], rel=1e-4), pre
        assert got[-1] < got[0]
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert [h[k] for h in runs[pre]] == pytest.approx([h[k] for h in want], rel=1e-3, abs=1e-5), (pre, k)


def test_modules_to_save_reference_is_a_frozen_copy(tiny_model_dir, tmp_path):
    """With modules_to_save the adapters' switch cannot restore the trained layers: the reference is a frozen copy
    of the starting weights, so step 0 is ln 2 and training runs (the swap stays out of the backward pass)."""
    import math

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=["lm_head"],
                                             use_gradient_checkpointing=True)
    trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(4), args=_args(tmp_path, max_steps=3))
    assert trainer.reference.is_copy
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.log_history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    for n, saved in trainer.reference.saved.items():  # the copy is the start, not the trained weights
        torch.testing.assert_close(saved, start[n], rtol=0, atol=0)


TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


@pytest.mark.parametrize("cfg", [dict(use_weighting=True), dict(ld_alpha=0.3),
                                 # (not "sft" or "hinge": TRL 1.16 crashes weighting their losses in place)
                                 dict(use_weighting=True, ld_alpha=0.5, loss_type=["sigmoid", "ipo", "apo_zero"],
                                      loss_weights=[1.0, 0.5, 0.2])],
                         ids=["wpo", "ld_dpo", "both_weighted_sum"])
def test_wpo_and_ld_dpo_equal_trl(cfg, tiny_model_dir, tmp_path):
    """use_weighting (WPO's per-pair weights from log p - log sum p^2) and ld_alpha (LD-DPO's down-weighted tail of
    the longer completion, on policy and reference): loss and LoRA gradients equal TRL 1.16's, and so do TRL's token
    metrics of the step (entropy, logits/chosen, logits/rejected, mean_token_accuracy) and rewards/*."""
    (model, tok, rows), ours, theirs, ref = _trl_twins_step(tiny_model_dir, tmp_path, cfg)
    mine = our_step(ours)
    assert_same_step(mine, ref)
    plain = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, beta=0.5))
    assert abs(float(our_step(plain)[0]) - float(mine[0])) > 1e-3  # the setting acts
    logged = ours.step_metrics()
    for key in TOKEN_METRICS + ("rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert logged[key] == pytest.approx(theirs._metrics["train"][key][-1], rel=1e-4, abs=1e-5), key


def test_precomputed_reference_with_ld_alpha_equals_reference_pass(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    rows = pair_rows(4)
    live = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, ld_alpha=0.4))
    pre = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                     args=_args(tmp_path, ld_alpha=0.4, precompute_ref_log_probs=True))
    batch = pre.to_device(pre.collate_batch(pre.train_examples[:4]))
    ref = live.sequence_logps(live.reference_logps(live.to_device(live.collate_batch(live.train_examples[:4]))),
                              batch)
    torch.testing.assert_close(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float(),
                               ref.float(), rtol=1e-5, atol=1e-5)


def test_wpo_and_ld_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="ld_alpha=-0.1 is invalid"):
        _args(tmp_path, ld_alpha=-0.1)
    with pytest.raises(ConfigError, match="does not combine with loss_type 'aot'"):
        _args(tmp_path, use_weighting=True, loss_type="aot")


@pytest.mark.parametrize("coef", [None, 0.2])
def test_moe_load_balancing_loss_equals_trl(coef, tiny_model_dir, tmp_path):
    """On a mixture-of-experts model TRL 1.16 adds router_aux_loss_coef (default: the config's) x the policy
    forward's load-balancing loss: loss, LoRA gradients (experts' LoRA included) and the aux_loss metric equal
    TRL's; 0.0 turns it off."""
    import trl
    from datasets import Dataset

    from preference_oracle import attention_lora_pair

    # LoRA on attention: the load-balancing loss reaches it through the routers' inputs
    model, tok, twin = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    rows = pair_rows(4)
    cfg = {} if coef is None else {"router_aux_loss_coef": coef}
    ours = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, beta=0.5, **cfg))
    theirs = trl.DPOTrainer(model=twin, args=trl_args(trl.DPOConfig, tmp_path, beta=0.5, **cfg),
                            train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert model.config.output_router_logits and theirs.aux_loss_enabled
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    shift_policy(model, twin)
    ref = trl_step(theirs, twin, theirs.data_collator([{k: ex[k] for k in keys} for ex in ours.train_examples]))
    mine = our_step(ours)
    assert_same_step(mine, ref)
    assert ours.step_metrics()["aux_loss"] == pytest.approx(theirs._metrics["train"]["aux_loss"][-1], rel=1e-5)
    # a step of 4 micro-batches takes a quarter in training; evaluation takes it whole (TRL: no accumulation there)
    ours.step_micro_batches, weight = 4, model.config.router_aux_loss_coef
    assert float(ours.aux_loss_share(torch.tensor(2.0))) == pytest.approx(weight * 0.5)
    model.eval()
    assert float(ours.aux_loss_share(torch.tensor(2.0))) == pytest.approx(weight * 2.0)
    model.train()
    off = DPOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                     args=_args(tmp_path, beta=0.5, router_aux_loss_coef=0.0))
    our_step(off)
    assert not model.config.output_router_logits and "aux_loss" not in off.step_metrics()
