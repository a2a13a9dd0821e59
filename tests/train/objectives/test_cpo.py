"""CPO / SimPO / AlphaPO against TRL 1.16's experimental CPOTrainer (loss and gradients on one batch, each loss type),
gradient accumulation, the MoE load-balancing loss, and the config's refusals."""
import warnings

import pytest
from preference_oracle import (assert_ga_invariant, assert_same_step, first_logged_loss, lora_pair, our_step,
                               pair_rows, trl_args, trl_pair_features, trl_step)

from fasttune import CPOConfig, CPOTrainer
from fasttune.errors import ConfigError


def _args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1, "shuffle": False,
          "learning_rate": 1e-2, "beta": 0.5, **kw}
    return CPOConfig(output_dir=str(tmp_path / "out"), **kw)


def _trl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "experimental" notice
        from trl.experimental.cpo import CPOConfig as TRLConfig, CPOTrainer as TRLTrainer
    return TRLConfig, TRLTrainer


def _compare(model, tok, twin, tmp_path, **kw):
    from datasets import Dataset

    trl_config, trl_trainer = _trl()
    rows = pair_rows(4)
    ours = CPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, **kw))
    theirs = trl_trainer(model=twin, args=trl_args(trl_config, tmp_path, beta=0.5, **kw),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    for ex, t in zip(ours.train_examples, theirs.train_dataset):  # same tokens as TRL's own tokenization
        assert ex["prompt_ids"] + ex["chosen_ids"] == t["chosen_input_ids"]
        assert ex["prompt_ids"] + ex["rejected_ids"] == t["rejected_input_ids"]
    ref = trl_step(theirs, twin, theirs.data_collator([trl_pair_features(ex) for ex in ours.train_examples]))
    assert_same_step(our_step(ours), ref)
    return ours, ref


@pytest.mark.parametrize("kw", [
    {}, dict(loss_type="hinge"), dict(loss_type="ipo"), dict(loss_type="simpo", simpo_gamma=0.3),
    dict(loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.5), dict(loss_type="alphapo", alpha=0.2),
    dict(loss_type="simpo", cpo_alpha=0.0)], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "cpo")
def test_loss_and_grads_equal_trl(kw, tiny_model_dir, tmp_path):
    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    ours, ref = _compare(model, tok, twin, tmp_path, **kw)
    assert first_logged_loss(ours) == pytest.approx(float(ref[0]), rel=1e-5)
    logged = ours.log_history[0]
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "nll_loss"} <= set(logged)
    if ours.args.cpo_alpha == 0:
        assert logged["nll_loss"] == 0


def test_gradient_accumulation_is_invariant(tiny_model_dir, tmp_path):
    """Both terms are means over the whole accumulated batch: pairs for the preference loss, the chosen completions'
    tokens for the NLL."""
    assert_ga_invariant(CPOTrainer, _args, pair_rows(8), tiny_model_dir("llama"), tmp_path)


def test_moe_load_balancing_loss_equals_trl(tiny_model_dir, tmp_path):
    """TRL's CPO adds router_aux_loss_coef x the load-balancing loss when the model config has output_router_logits."""
    from preference_oracle import attention_lora_pair

    model, tok, twin = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    for config in (model.config, twin.config):
        config.output_router_logits, config.router_aux_loss_coef = True, 0.3
    ours, _ = _compare(model, tok, twin, tmp_path, loss_type="simpo")
    assert "aux_loss" in ours.step_metrics()


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="dpo"), "not a CPO loss"), (dict(beta=0), "beta=0(.0)? is invalid"),
    (dict(label_smoothing=0.5), "label_smoothing=0.5 is invalid"),
    (dict(loss_type="ipo", label_smoothing=0.1), "applies to the sigmoid and simpo losses"),
    (dict(cpo_alpha=-1.0), "cpo_alpha=-1.0 is invalid"), (dict(max_prompt_length=0), "max_prompt_length=0")])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        CPOConfig(output_dir="o", **kw)


def test_alphapo_is_simpo_without_the_nll_term():
    c = CPOConfig(output_dir="o", loss_type="alphapo", alpha=0.1)
    assert (c.loss_type, c.cpo_alpha, c.alpha) == ("simpo", 0.0, 0.1)
