"""ORPO against TRL 1.16's experimental ORPOTrainer (loss and gradients on one batch), and gradient accumulation."""
import pytest
from preference_oracle import (assert_ga_invariant, assert_same_step, first_logged_loss, lora_pair, our_step,
                               pair_rows, trl_args, trl_pair_features, trl_step)

from fasttune import ORPOConfig, ORPOTrainer


def _args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1, "shuffle": False,
          "learning_rate": 1e-2, "beta": 0.5, **kw}
    return ORPOConfig(output_dir=str(tmp_path / "out"), **kw)


def test_loss_and_grads_equal_trl(tiny_model_dir, tmp_path):
    import warnings

    from datasets import Dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "experimental" notice
        from trl.experimental.orpo import ORPOConfig as TRLConfig, ORPOTrainer as TRLTrainer

    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    rows = pair_rows(4)
    ours = ORPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path))
    theirs = TRLTrainer(model=twin, args=trl_args(TRLConfig, tmp_path, beta=0.5), train_dataset=Dataset.from_list(rows),
                        processing_class=tok)
    for ex, t in zip(ours.train_examples, theirs.train_dataset):  # same tokens as TRL's own tokenization
        assert ex["prompt_ids"] + ex["chosen_ids"] == t["chosen_input_ids"]
        assert ex["prompt_ids"] + ex["rejected_ids"] == t["rejected_input_ids"]
    ref = trl_step(theirs, twin, theirs.data_collator([trl_pair_features(ex) for ex in ours.train_examples]))
    assert_same_step(our_step(ours), ref)
    assert first_logged_loss(ours) == pytest.approx(float(ref[0]), rel=1e-5)
    assert {"rewards/chosen", "rewards/margins", "nll_loss", "log_odds_ratio"} <= set(ours.log_history[0])


def test_gradient_accumulation_is_invariant(tiny_model_dir, tmp_path):
    """Both terms are means over the whole accumulated batch: chosen tokens for the NLL, pairs for the odds ratio."""
    assert_ga_invariant(ORPOTrainer, _args, pair_rows(8), tiny_model_dir("llama"), tmp_path)


@pytest.mark.parametrize("router_logits", [True, False])
def test_moe_load_balancing_loss_equals_trl(router_logits, tiny_model_dir, tmp_path):
    """TRL's ORPO adds router_aux_loss_coef x the load-balancing loss when the model config has output_router_logits
    set (and only then): loss and LoRA gradients equal TRL's either way on a tiny Qwen3-MoE."""
    import warnings

    from datasets import Dataset
    from preference_oracle import attention_lora_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "experimental" notice
        from trl.experimental.orpo import ORPOConfig as TRLConfig, ORPOTrainer as TRLTrainer

    model, tok, twin = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    for config in (model.config, twin.config):
        config.output_router_logits, config.router_aux_loss_coef = router_logits, 0.3
    rows = pair_rows(4)
    ours = ORPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path))
    theirs = TRLTrainer(model=twin, args=trl_args(TRLConfig, tmp_path, beta=0.5), train_dataset=Dataset.from_list(rows),
                        processing_class=tok)
    assert theirs.aux_loss_enabled is router_logits
    ref = trl_step(theirs, twin, theirs.data_collator([trl_pair_features(ex) for ex in ours.train_examples]))
    assert_same_step(our_step(ours), ref)
    assert ("aux_loss" in ours.step_metrics()) is router_logits
