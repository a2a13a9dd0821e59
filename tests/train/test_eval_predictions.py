"""train/eval_predictions.py: compute_metrics on SFTTrainer's evaluation equals transformers' Trainer's on the same
model, eval rows, batches and function (with and without preprocess_logits_for_metrics); and our model under
transformers' Trainer hands compute_metrics its logits alone."""
import numpy as np
import pytest

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

ROWS = [{"prompt": f"alpha {i}", "completion": " beta gamma" * (1 + i % 3)} for i in range(7)]


def _accuracy(p):
    preds = p.predictions if p.predictions.ndim == 2 else p.predictions.argmax(-1)
    preds, labels = preds[:, :-1], p.label_ids[:, 1:]
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean()), "targets": int(mask.sum()),
            "shape": list(p.label_ids.shape)}


def _argmax(logits, labels):
    return logits.argmax(-1)


@pytest.mark.parametrize("preprocess", [None, _argmax], ids=["logits", "argmax"])
def test_compute_metrics_equals_transformers_trainer(preprocess, tiny_model_dir, tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=1)
    ours = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS,
                      args=SFTConfig(output_dir=str(tmp_path / "o"), per_device_eval_batch_size=3),
                      compute_metrics=_accuracy, preprocess_logits_for_metrics=preprocess)
    mine = ours.evaluate()
    rows = [{"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])} for ex in ours.eval_examples]
    theirs = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=3,
                                                         report_to=[], remove_unused_columns=False),
                     eval_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok), compute_metrics=_accuracy,
                     preprocess_logits_for_metrics=preprocess).evaluate()
    assert mine["eval_targets"] == theirs["eval_targets"] > 0 and mine["eval_shape"] == theirs["eval_shape"]
    assert mine["eval_accuracy"] == theirs["eval_accuracy"]
    assert ours.evaluate()["eval_accuracy"] == mine["eval_accuracy"]  # each pass starts afresh


def test_compute_metrics_misuse_is_named(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = SFTConfig(output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="preprocess_logits_for_metrics must be a function"):
        SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=args,
                   preprocess_logits_for_metrics="argmax")
    t = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS[:2], args=args,
                   compute_metrics=lambda p: np.float32(1.0))
    with pytest.raises(ConfigError, match="compute_metrics returned float32; it must return a dict"):
        t.evaluate()


def test_predict_equals_transformers_trainer(tiny_model_dir, tmp_path):
    """Trainer.predict: the same predictions (the argmax here), label_ids and metrics as transformers' Trainer,
    without compute_metrics too; evaluation afterwards gathers nothing."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=1)
    ours = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS[:2],
                      args=SFTConfig(output_dir=str(tmp_path / "o"), per_device_eval_batch_size=3),
                      preprocess_logits_for_metrics=_argmax)
    mine = ours.predict(ROWS)
    rows = [{"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])} for ex in ours.prepare(ROWS)]
    theirs = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=3,
                                                         report_to=[], remove_unused_columns=False),
                     data_collator=DataCollatorForSeq2Seq(tok), preprocess_logits_for_metrics=_argmax).predict(rows)
    assert np.array_equal(mine.predictions, theirs.predictions) and np.array_equal(mine.label_ids, theirs.label_ids)
    assert set(mine.metrics) == {"test_loss"} and ours.predictions is None
    # evaluate() afterwards: the loss and TRL's token metrics, no compute_metrics
    assert set(ours.evaluate()) == {"eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"}


def test_compute_metrics_per_named_eval_set(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    t = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, compute_metrics=_accuracy,
                   args=SFTConfig(output_dir=str(tmp_path / "o"), per_device_eval_batch_size=3))
    both = t.evaluate({"a": ROWS[:2], "b": ROWS[2:]})
    assert both["eval_a_targets"] == t.evaluate(ROWS[:2])["eval_targets"] and "eval_b_accuracy" in both
    assert t.predictions is None
