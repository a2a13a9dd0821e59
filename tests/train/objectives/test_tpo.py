"""TPO against TRL 1.16's experimental TPOTrainer (tokens, loss and gradients on one batch, each loss type, the NLL
term off), gradient accumulation, the data's and the config's refusals, and the CLI method."""
import warnings

import pytest
from preference_oracle import (WORDS, assert_ga_invariant, assert_same_step, first_logged_loss, lora_pair,
                               our_step, trl_args, trl_step)

from fasttune import TPOConfig, TPOTrainer
from fasttune.errors import ConfigError, DataError


def triple_rows(n=8):
    # Different lengths, so that batches carry padding.
    return [{"prompt": f"Q{i}: {WORDS[i % 5]}?", "chosen": " yes " + "ok " * (1 + i % 3),
             "rejected": " no" + "!" * (1 + (i * 2) % 5), "reference": " yes, " + "sure " * (1 + i % 2)}
            for i in range(n)]


def _args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1, "shuffle": False,
          "learning_rate": 1e-2, "beta": 0.5, **kw}
    return TPOConfig(output_dir=str(tmp_path / "out"), **kw)


def _trl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "experimental" notice
        from trl.experimental.tpo import TPOConfig as TRLConfig, TPOTrainer as TRLTrainer
    return TRLConfig, TRLTrainer


def _compare(model, tok, twin, tmp_path, **kw):
    from datasets import Dataset

    trl_config, trl_trainer = _trl()
    rows = triple_rows(4)
    ours = TPOTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path, **kw))
    theirs = trl_trainer(model=twin, args=trl_args(trl_config, tmp_path, beta=0.5, **kw),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    for ex, t in zip(ours.train_examples, theirs.train_dataset):  # same tokens as TRL's own tokenization
        for side in ("prompt", "chosen", "rejected", "reference"):
            assert ex[f"{side}_ids"] == t[f"{side}_ids"], side
    features = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "reference_ids")}
                for ex in ours.train_examples]
    ref = trl_step(theirs, twin, theirs.data_collator(features))
    assert_same_step(our_step(ours), ref)
    ours_metrics, trl_metrics = ours.step_metrics(), theirs._metrics["train"]
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
                 "rewards/margins", "logps/rejected"):
        assert ours_metrics[name] == pytest.approx(trl_metrics[name][-1], rel=1e-4, abs=1e-6), name
    return ours, ref


@pytest.mark.parametrize("kw", [
    {}, dict(loss_type="hinge"), dict(loss_type="ipo"), dict(loss_type="tpo-l", tpo_l_gamma=0.3),
    dict(loss_type="sigmoid", label_smoothing=0.1, tpo_alpha=0.5), dict(tpo_alpha=0.0)],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "tpo")
def test_loss_and_grads_equal_trl(kw, tiny_model_dir, tmp_path):
    model, tok, twin = lora_pair(tiny_model_dir("llama"), tmp_path)
    ours, ref = _compare(model, tok, twin, tmp_path, **kw)
    assert first_logged_loss(ours) == pytest.approx(float(ref[0]), rel=1e-5)
    logged = ours.log_history[0]
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logits/chosen", "entropy",
            "mean_token_accuracy"} <= set(logged)



def test_moe_adds_no_load_balancing_loss_as_trl(tiny_model_dir, tmp_path):
    """TRL's TPO scores the logits only: with output_router_logits set, no load-balancing loss joins the loss."""
    from preference_oracle import attention_lora_pair

    model, tok, twin = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    for config in (model.config, twin.config):
        config.output_router_logits, config.router_aux_loss_coef = True, 0.3
    _compare(model, tok, twin, tmp_path, loss_type="tpo-l")


def test_gradient_accumulation_is_invariant(tiny_model_dir, tmp_path):
    """Both terms are means over the whole accumulated batch: triples for the preference loss, the reference
    completions' tokens for the NLL."""
    assert_ga_invariant(TPOTrainer, _args, triple_rows(8), tiny_model_dir("llama"), tmp_path)


def test_implicit_prompt_and_bad_rows(tiny_tokenizer):
    from fasttune.data.triple_preference import tokenize_triple_rows

    rows = [{"chosen": "Q: a? yes", "rejected": "Q: a? no", "reference": "Q: a? yes indeed"}]
    (ex,) = tokenize_triple_rows(rows, tiny_tokenizer, max_seq_length=64)
    explicit = tokenize_triple_rows([{"prompt": "Q: a?", "chosen": " yes", "rejected": " no",
                                      "reference": " yes indeed"}], tiny_tokenizer, max_seq_length=64)[0]
    assert ex == explicit
    with pytest.raises(DataError, match="'reference' does not start with it"):
        tokenize_triple_rows([{**rows[0], "reference": "Other: yes"}], tiny_tokenizer, max_seq_length=64)
    with pytest.raises(DataError, match="no column 'reference'.*triple-preference data"):
        tokenize_triple_rows([{"prompt": "Q", "chosen": " a", "rejected": " b"}], tiny_tokenizer, max_seq_length=64)


def test_conversational_rows_explicit_and_implicit(tiny_tokenizer):
    """Message lists go through the chat template (the completions end with its end-of-turn); without a prompt
    column the shared leading messages are the prompt, the reference's included."""
    from fasttune.data.triple_preference import tokenize_triple_rows

    user = [{"role": "user", "content": "Hi?"}]
    replies = {side: [{"role": "assistant", "content": text}] for side, text in
               (("chosen", "Hello."), ("rejected", "Go away."), ("reference", "Hello there!"))}
    (explicit,) = tokenize_triple_rows([{"prompt": user, **replies}], tiny_tokenizer, max_seq_length=128)
    (implicit,) = tokenize_triple_rows([{side: user + msgs for side, msgs in replies.items()}], tiny_tokenizer,
                                       max_seq_length=128)
    assert implicit == explicit
    assert tiny_tokenizer.decode(explicit["reference_ids"]) == "Hello there!<|im_end|>\n"


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="simpo"), "not a TPO loss"), (dict(beta=0), "beta=0(.0)? is invalid"),
    (dict(label_smoothing=0.5), "label_smoothing=0.5 is invalid"),
    (dict(loss_type="ipo", label_smoothing=0.1), "applies to the sigmoid and tpo-l losses"),
    (dict(tpo_alpha=-1.0), "tpo_alpha=-1.0 is invalid"), (dict(max_prompt_length=0), "max_prompt_length=0")])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        TPOConfig(output_dir="o", **kw)


def test_cli_trains_tpo(tiny_model_dir, tmp_path, capsys):
    import json

    from fasttune.cli import main

    data = tmp_path / "triples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in triple_rows(4)))
    out = tmp_path / "run"
    rc = main(["train", "--method", "tpo", "--model", str(tiny_model_dir("llama")), "--data", str(data),
               "--output-dir", str(out), "--max-steps", "1", "--lora-r", "4", "--tpo-alpha", "0.5"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").exists() or any(out.rglob("adapter_model.safetensors"))
