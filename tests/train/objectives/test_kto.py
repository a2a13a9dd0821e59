"""KTO against TRL 1.16's KTOTrainer (loss and gradients on one batch, KL from mismatched pairs), and gradient
accumulation."""
import pytest
from preference_oracle import (assert_ga_invariant, assert_same_step, first_logged_loss, lora_pair, our_step,
                               shift_policy, trl_args, trl_step, unpaired_rows)

from fasttune import FastLanguageModel, KTOConfig, KTOTrainer
from fasttune.errors import ConfigError


def _args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1, "shuffle": False,
          "learning_rate": 1e-2, "beta": 0.5, "undesirable_weight": 1.5, **kw}
    return KTOConfig(output_dir=str(tmp_path / "out"), **kw)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_loss_and_grads_equal_trl(loss_type, tiny_model_dir, tmp_path):
    import trl
    from datasets import Dataset

    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    rows = unpaired_rows(4)
    ours = KTOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, loss_type=loss_type))
    theirs = trl.KTOTrainer(model=twin, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            args=trl_args(trl.KTOConfig, tmp_path, beta=0.5, undesirable_weight=1.5,
                                          loss_type=loss_type, train_sampling_strategy="sequential"))
    keys = ("prompt_ids", "completion_ids", "label")
    assert [[ex[k] for k in keys] for ex in ours.train_examples] == [[t[k] for k in keys] for t in theirs.train_dataset]
    examples = [{k: ex[k] for k in keys} for ex in ours.train_examples]
    if loss_type == "kto":  # TRL's mismatched pairs: the completions rotated by one within the batch
        for ex, prev in zip(examples, examples[-1:] + examples[:-1]):
            ex["KL_completion_ids"] = prev["completion_ids"]
    shift_policy(model, twin)
    ref = trl_step(theirs, twin, theirs.data_collator(examples))
    assert_same_step(our_step(ours), ref)
    logged = ours.step_metrics()  # TRL's token metrics of the step: entropy, logits/* by label
    for key in ("entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "logps/rejected"):
        assert logged[key] == pytest.approx(theirs._metrics["train"][key][-1], rel=1e-4, abs=1e-5), key
    assert first_logged_loss(ours) == pytest.approx(float(ref[0]), rel=1e-5)
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "entropy",
            "num_tokens"} <= set(ours.log_history[0])
    if loss_type == "kto":
        # a difference of two summed log-probs (~ -35 each): fp32 rounding is ~1e-6 in absolute terms
        assert ours.log_history[0]["kl"] == pytest.approx(theirs._metrics["train"]["kl"][-1], abs=2e-5)


def test_gradient_accumulation_is_invariant(tiny_model_dir, tmp_path):
    """The KL estimate and the mean run over the whole accumulated batch, so micro-batching does not change them."""
    trainer = assert_ga_invariant(KTOTrainer, _args, unpaired_rows(8), tiny_model_dir("llama"), tmp_path)
    assert all("kl" in h for h in trainer.log_history)


def test_full_finetuning_keeps_a_reference_copy(tiny_model_dir, tmp_path):
    """As TRL keeps a reference model: step 1's rewards are 0 (policy == reference), step 2's are not."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    trainer = KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(4),
                         args=_args(tmp_path, max_steps=2, learning_rate=1e-3, logging_steps=1))
    assert len(trainer.reference.saved) == len(list(model.parameters()))
    trainer.train()
    first, second = trainer.log_history[:2]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and abs(second["rewards/chosen"]) > 1e-4


def test_one_row_per_step_is_refused(tiny_model_dir, tmp_path):
    """TRL 1.16 refuses per_device_train_batch_size=1 ("the KL term will be equivalent to the implied reward"); our
    KL runs over the accumulated batch, so only one row per step is refused (bs 1 x GA 2 is fine)."""
    import trl
    from datasets import Dataset

    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    with pytest.raises(ValueError, match="batch size must be > 1"):  # the oracle refuses it
        trl.KTOTrainer(model=twin, train_dataset=Dataset.from_list(unpaired_rows(4)), processing_class=tok,
                       args=trl.KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=1,
                                          use_cpu=True, report_to=[], bf16=False))
    with pytest.raises(ConfigError, match=r"one row per optimizer step.*gradient_accumulation_steps to 2"):
        KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(4),
                   args=_args(tmp_path, per_device_train_batch_size=1))
    KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(4),
               args=_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2))
    KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(4),  # no KL term
               args=_args(tmp_path, per_device_train_batch_size=1, loss_type="apo_zero_unpaired"))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 2.5), (0.4, 1.0), (1.0, 5.0)])
def test_unbalanced_data_gets_trls_weight_advice(weights, tiny_model_dir, tmp_path, caplog):
    import logging
    import re
    import warnings

    import trl
    from datasets import Dataset

    rows = [{**r, "label": i < 6} for i, r in enumerate(unpaired_rows(8))]  # 6 desirable : 2 undesirable
    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    kw = dict(desirable_weight=weights[0], undesirable_weight=weights[1])
    with caplog.at_level(logging.WARNING):
        trl.KTOTrainer(model=twin, train_dataset=Dataset.from_list(rows), processing_class=tok,
                       args=trl_args(trl.KTOConfig, tmp_path, **kw))
    theirs = [r.getMessage() for r in caplog.records if "ideal range" in r.getMessage()]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        KTOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, **kw))
    ours = [str(w.message) for w in seen if "ideal range" in str(w.message)]
    assert len(ours) == len(theirs) == (weights in [(1.0, 1.0), (1.0, 5.0)])
    if ours:  # the same recommended ranges: for 6:2 at 1/1, desirable in [0.33, 0.44] or undesirable in [2.26, 3.0]
        ranges = r"desirable_weight in \[[\d.]+, [\d.]+\] or undesirable_weight in \[[\d.]+, [\d.]+\]"
        assert re.search(ranges, ours[0]).group() == re.search(ranges, theirs[0]).group()
        if weights == (1.0, 1.0):
            assert "desirable_weight in [0.33, 0.44] or undesirable_weight in [2.26, 3.0]" in ours[0]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_reference_is_the_loaded_adapter_as_in_trl(loss_type, tiny_model_dir, tmp_path):
    """KTO started from a saved adapter: the reference is that adapter (TRL 1.16 copies it as "ref"); step 0 has
    KL 0 and rewards 0 (loss = the weighted mean of 1 - sigmoid(0)), and the next steps' losses, KL and rewards are
    TRL's. precompute_ref_log_probs=True gives the same numbers, on both sides."""
    import trl
    from datasets import Dataset
    from peft_oracle import peft_twin

    lora_pair(tiny_model_dir("llama"), tmp_path)  # saves the adapter (random LoRA B) to tmp_path / "init"
    rows, steps = unpaired_rows(4), 3
    ours, theirs = {}, {}
    for pre in (False, True):
        model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "init"))
        trainer = KTOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                             args=_args(tmp_path / f"o{pre}", max_steps=steps, precompute_ref_log_probs=pre,
                                        loss_type=loss_type))
        assert ("ref_logps" in trainer.train_examples[0]) == pre
        trainer.train()
        ours[pre] = trainer.log_history
        tr = trl.KTOTrainer(model=peft_twin("llama", tmp_path / "init"), train_dataset=Dataset.from_list(rows),
                            processing_class=tok,
                            args=trl_args(trl.KTOConfig, tmp_path / f"t{pre}", beta=0.5, undesirable_weight=1.5,
                                          max_steps=steps, learning_rate=1e-2, logging_steps=1, loss_type=loss_type,
                                          train_sampling_strategy="sequential", precompute_ref_log_probs=pre))
        tr.train()
        theirs[pre] = [h for h in tr.state.log_history if "loss" in h]
    want = theirs[False]
    first = ours[False][0]
    if loss_type == "kto":
        assert want[0]["loss"] == pytest.approx((0.5 + 0.75 + 0.5 + 0.5) / 4, abs=1e-6)  # labels T, F, T, T
        assert first["kl"] == pytest.approx(0, abs=1e-5)
    assert first["loss"] == pytest.approx(want[0]["loss"], abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) == want[0]["rewards/chosen"]
    for pre in (False, True):
        assert [h["loss"] for h in theirs[pre]] == pytest.approx([h["loss"] for h in want], rel=1e-5), pre
        got = ours[pre]
        assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-4), pre
        for k in ("rewards/chosen", "rewards/rejected") + (("kl",) if loss_type == "kto" else ()):
            assert [h[k] for h in got] == pytest.approx([h[k] for h in want], rel=1e-3, abs=1e-5), (pre, k)
        assert got[-1]["loss"] < got[0]["loss"]


def test_precomputed_reference_allows_full_finetuning_without_kl(tiny_model_dir, tmp_path):
    """With every reference log-prob computed before training (apo_zero_unpaired has no KL rows), full fine-tuning
    needs no second copy of the model; loss_type="kto" still pairs its KL rows per step, so it keeps one."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    trainer = KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(4),
                         args=_args(tmp_path, max_steps=2, learning_rate=1e-4, loss_type="apo_zero_unpaired",
                                    precompute_ref_log_probs=True))
    assert trainer.reference is None
    trainer.train()
    first = trainer.log_history[0]
    # step 0: policy = reference, rewards 0; the loss is the weighted mean of 1 - sigmoid(0) (desirable, weight 1)
    # and sigmoid(0) (undesirable, weight 1.5) over the labels T, F, T, T
    assert first["loss"] == pytest.approx((0.5 + 0.75 + 0.5 + 0.5) / 4, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert trainer.log_history[1]["loss"] < first["loss"]
    kl_rows = KTOTrainer(model=model, tokenizer=tok, train_dataset=unpaired_rows(4),
                         args=_args(tmp_path, precompute_ref_log_probs=True))
    assert kl_rows.reference.is_copy  # loss_type="kto" pairs its KL rows anew each step: their reference passes stay


def test_moe_load_balancing_loss_equals_trl(tiny_model_dir, tmp_path):
    """TRL 1.16's KTO adds the config's router_aux_loss_coef x the policy forward's load-balancing loss on a
    mixture-of-experts model: loss, LoRA gradients and aux_loss equal TRL's."""
    import trl
    from datasets import Dataset
    from preference_oracle import attention_lora_pair

    # LoRA on attention: the load-balancing loss reaches it through the routers' inputs
    model, tok, twin = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    rows = unpaired_rows(4)
    ours = KTOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                      args=_args(tmp_path, loss_type="apo_zero_unpaired", router_aux_loss_coef=0.3))
    theirs = trl.KTOTrainer(model=twin, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            args=trl_args(trl.KTOConfig, tmp_path, beta=0.5, undesirable_weight=1.5,
                                          loss_type="apo_zero_unpaired", router_aux_loss_coef=0.3,
                                          train_sampling_strategy="sequential"))
    keys = ("prompt_ids", "completion_ids", "label")
    shift_policy(model, twin)
    ref = trl_step(theirs, twin, theirs.data_collator([{k: ex[k] for k in keys} for ex in ours.train_examples]))
    assert_same_step(our_step(ours), ref)
    assert ours.step_metrics()["aux_loss"] == pytest.approx(theirs._metrics["train"]["aux_loss"][-1], rel=1e-5)
