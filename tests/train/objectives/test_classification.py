"""ClassificationTrainer (train/objectives/classification.py) against transformers' Trainer on the same classifier
and rows; the CLI's --method classification with class names."""
import json

import pytest
import torch
from fasttune import ClassificationConfig, ClassificationTrainer, FastLanguageModel
from fasttune.cli import main
from fasttune.errors import ConfigError
from tiny import hf_model, load_classifier, save_hf

ROWS = [{"text": "great film, loved it", "label": 2}, {"text": "dull", "label": 0},
        {"text": "it was fine I guess, nothing more", "label": 1}, {"text": "wonderful!", "label": 2},
        {"text": "bad plot", "label": 0}, {"text": "ok", "label": 1}, {"text": "superb acting", "label": 2},
        {"text": "boring and long", "label": 0}]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("classify") / "llama"
    save_hf(hf_model("llama"), folder, tiny_tokenizer)
    return folder


def _classifier(folder):
    return load_classifier(folder, lora_r=4)


def test_losses_equal_transformers_trainer(base_dir, tmp_path):
    """Per-step losses (2 x 2 accumulated, linear schedule, clipping) equal transformers' Trainer with
    DataCollatorWithPadding on the same model and rows; accuracy is logged."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tok = _classifier(base_dir)
    args = ClassificationConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
                                shuffle=False)
    ours = ClassificationTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=args)
    ours.train()
    mine = [h["loss"] for h in ours.log_history if "loss" in h]
    assert "accuracy" in ours.log_history[0]

    model, tok = _classifier(base_dir)
    rows = datasets.Dataset.from_list(ROWS).map(lambda r: tok(r["text"]), remove_columns=["text"])
    theirs = Trainer(model=model, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                     args=TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2,
                                            gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
                                            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                            train_sampling_strategy="sequential", optim="adamw_torch"))
    theirs.train()
    ref = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    metrics = ours.evaluate(ROWS[:4])
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_loss"] > 0


def test_refusals(base_dir):
    """A language model and packing are refused by name."""
    lm, tok = FastLanguageModel.from_pretrained(str(base_dir), dtype=torch.float32)
    with pytest.raises(ConfigError, match="auto_model=AutoModelForSequenceClassification"):
        ClassificationTrainer(model=lm, processing_class=tok, train_dataset=ROWS)
    model, tok = _classifier(base_dir)
    with pytest.raises(ConfigError, match="packing=True"):
        ClassificationTrainer(model=model, processing_class=tok, train_dataset=ROWS,
                              args=ClassificationConfig(packing=True))


def test_cli_learns_class_names(base_dir, tmp_path, capsys):
    """`fasttune train --method classification` reads the classes from the rows' names, writes a SEQ_CLS adapter,
    and the classifier it loads back names them."""
    names = {0: "negative", 1: "neutral", 2: "positive"}
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"text": r["text"], "sentiment": names[r["label"]]}) for r in ROWS))
    out = tmp_path / "out"
    rc = main(["train", "--method", "classification", "--model", str(base_dir), "--data", str(data),
               "--label-field", "sentiment", "--output-dir", str(out), "--max-steps", "2", "--lora-r", "4"])
    assert rc == 0, capsys.readouterr().err
    assert "accuracy" in capsys.readouterr().out  # (the run's summary line)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert "accuracy" in log[0]
    model, _ = FastLanguageModel.from_pretrained(str(out / "adapter"), dtype=torch.float32)  # names kept beside it
    assert model.config.num_labels == 3 and model.config.id2label == names
    rc = main(["train", "--method", "classification", "--model", str(base_dir), "--output-dir", str(tmp_path / "x")])
    assert rc != 0 and "needs --data with labelled rows" in capsys.readouterr().err
