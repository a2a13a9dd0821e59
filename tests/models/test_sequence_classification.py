"""Sequence classifiers and reward models on our decoder (models/sequence_classification.py) against transformers'
<Family>ForSequenceClassification + PEFT's SEQ_CLS adapters: scores, losses, gradients, saved files, refusals."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from peft_oracle import peft_grads, randomize_lora_b
from tiny import hf_model, load_classifier, save_hf

PAD = 0  # the tiny configs' pad_token_id
# right padding, left padding, no padding: each row's score is at its last real token
IDS = torch.tensor([[5, 17, 42, 99, 7, PAD, PAD], [PAD, PAD, 33, 8, 250, 61, 12], [9, 10, 11, 12, 13, 14, 15]])
MASK = (IDS != PAD).long()
TOK_PAD = 256  # the tiny tokenizer's pad token, which a model loaded with it pools by
TOK_IDS = IDS.masked_fill(IDS == PAD, TOK_PAD)


def _pair(folder, family, num_labels, **kwargs):
    """(ours: a SequenceClassifier loaded from transformers' tiny `family` LM in `folder`, transformers' classifier
    from the same folder with our score head)."""
    save_hf(hf_model(family), folder)
    ours, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, num_labels=num_labels,
                                                auto_model=AutoModelForSequenceClassification, **kwargs)
    theirs = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels,
                                                                dtype=torch.float32, attn_implementation="eager",
                                                                **kwargs).eval()
    with torch.no_grad():
        theirs.score.weight.copy_(ours.score.weight)
    return ours, theirs


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "qwen3_moe"])
def test_lora_classifier_equals_transformers_peft(tmp_path, family):
    """Scores, loss and every trainable gradient (LoRA and the score head) equal transformers' classifier with our
    adapter loaded by PEFT; the adapter's config is what PEFT writes for SEQ_CLS."""
    from peft import PeftModel

    ours, base = _pair(tmp_path / "base", family, 3)
    assert type(ours).__name__ == "SequenceClassifier" and ours.lm_head is None
    assert ours.config.architectures == [type(base).__name__]
    ours = FastLanguageModel.get_peft_model(ours, r=4, target_modules=["q_proj", "v_proj", "down_proj"]
                                            if family != "qwen3_moe" else ["q_proj", "v_proj"],
                                            use_gradient_checkpointing=False)
    randomize_lora_b(ours)
    ours.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "score"]
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)
    labels = torch.tensor([2, 0, 1])
    mine = ours(input_ids=IDS, attention_mask=MASK, labels=labels)
    ref = theirs(input_ids=IDS, attention_mask=MASK, labels=labels)
    torch.testing.assert_close(mine.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.loss, ref.loss, rtol=1e-5, atol=1e-6)
    mine.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert "score.weight" in grads and len(grads) > 1
    theirs_grads = peft_grads(theirs)
    for n, g in grads.items():
        key = n.removesuffix(".weight") if ".lora_" in n else n
        torch.testing.assert_close(g, theirs_grads[key], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_problem_types_equal_transformers(tmp_path, problem):
    """num_labels=1 (a reward model's head: regression) and multi-label BCE give transformers' logits and loss."""
    n = 1 if problem == "regression" else 4
    ours, theirs = _pair(tmp_path / "m", "llama", n)
    labels = torch.tensor([0.5, -1.0, 2.0]) if n == 1 else torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]])
    mine = ours(input_ids=IDS, attention_mask=MASK, labels=labels)
    ref = theirs(input_ids=IDS, attention_mask=MASK, labels=labels)
    assert ours.config.problem_type == theirs.config.problem_type == problem
    torch.testing.assert_close(mine.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.loss, ref.loss, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("cls") / "llama"
    save_hf(hf_model("llama"), folder, tiny_tokenizer)
    return folder


def _classifier(folder, **kwargs):
    return load_classifier(folder, **kwargs)


@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_num_items_in_batch_makes_accumulation_exact(classifier_dir, problem):
    """Two halves, each divided by the whole batch's label count (transformers.Trainer's num_items_in_batch), sum to
    the whole batch's mean loss for every problem type (transformers' own MSE / BCE are per-half means)."""
    n = 1 if problem == "regression" else 3
    model, _ = _classifier(classifier_dir, num_labels=n, problem_type=problem)
    labels = {"single_label_classification": torch.tensor([2, 0, 1, 1]), "regression": torch.tensor([.5, -1., 2., 0.]),
              "multi_label_classification": torch.tensor([[1., 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])}[problem]
    ids = torch.cat([TOK_IDS, TOK_IDS[:1].flip(-1)])
    whole = model(input_ids=ids, attention_mask=(ids != TOK_PAD).long(), labels=labels).loss
    count = labels.ne(-100).sum()
    halves = sum(model(input_ids=ids[s], attention_mask=(ids[s] != TOK_PAD).long(), labels=labels[s],
                       num_items_in_batch=count).loss for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(halves, whole, rtol=1e-6, atol=1e-7)


def test_adapter_and_merged_files_load_everywhere(classifier_dir, tmp_path):
    """Our SEQ_CLS adapter reloads in fasttune as a classifier (num_labels from its head); the merged checkpoint
    loads in transformers' AutoModelForSequenceClassification and back in fasttune without auto_model; a PEFT-written
    SEQ_CLS adapter loads in fasttune. Same scores everywhere."""
    from peft import LoraConfig, get_peft_model

    model, tok = _classifier(classifier_dir, id2label={0: "neg", 1: "neu", 2: "pos"})
    assert tok.pad_token_id is not None and model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    with torch.no_grad():
        model.score.weight.normal_()
    want = model(input_ids=TOK_IDS, attention_mask=MASK).logits
    model.save_pretrained(tmp_path / "adapter", tokenizer=tok)
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32)
    assert again.is_sequence_classifier and again.lora_settings.modules_to_save == ["score"]
    assert again.config.id2label == {0: "neg", 1: "neu", 2: "pos"}  # classifier_head.json beside the adapter
    torch.testing.assert_close(again(input_ids=TOK_IDS, attention_mask=MASK).logits, want)

    model.save_pretrained_merged(tmp_path / "merged", tok)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["id2label"]["2"] == "pos"
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(hf(input_ids=TOK_IDS, attention_mask=MASK).logits, want, rtol=1e-5, atol=1e-5)
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert reloaded.is_sequence_classifier and reloaded.config.id2label[2] == "pos"
    torch.testing.assert_close(reloaded(input_ids=TOK_IDS, attention_mask=MASK).logits, want, rtol=1e-5, atol=1e-5)

    peft = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["k_proj"]))
    randomize_lora_b(peft)
    peft.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "merged")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    from_peft, _ = FastLanguageModel.from_pretrained(str(tmp_path / "peft"), dtype=torch.float32)
    torch.testing.assert_close(from_peft(input_ids=TOK_IDS, attention_mask=MASK).logits,
                               peft(input_ids=TOK_IDS, attention_mask=MASK).logits, rtol=1e-5, atol=1e-5)


def test_trainer_and_reward_trainer_train_it(classifier_dir, tmp_path):
    """transformers.Trainer with DataCollatorWithPadding trains a classifier (gradient accumulation 2 x 2 lands
    on the parameters 1 x 4 does), and TRL's RewardTrainer trains a num_labels=1 model with our LoRA."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from trl import RewardConfig, RewardTrainer

    trainer_of_last_run = []

    def trained(batch, accumulation):
        torch.manual_seed(0)  # the new score head's draw
        model, tok = _classifier(classifier_dir)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
        rows = Dataset.from_dict({"text": ["good film", "bad plot, dull", "it was fine I guess", "loved it!"],
                                  "label": [2, 0, 1, 2]}).map(lambda r: tok(r["text"]), remove_columns=["text"])
        args = TrainingArguments(output_dir=str(tmp_path / f"t{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-1,
                                 optim="sgd", report_to=[], use_cpu=True, save_strategy="no")
        # (the 4 rows form one optimizer step either way, so their order does not matter)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                          eval_dataset=rows, compute_metrics=lambda p: {
                              "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
        trainer_of_last_run[:] = [trainer]
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    one, two = trained(4, 1), trained(2, 2)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6, msg=n)
    metrics = trainer_of_last_run[0].evaluate()  # transformers' evaluation loop with compute_metrics
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_loss"] > 0

    model, tok = _classifier(classifier_dir, num_labels=1)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    pairs = Dataset.from_dict({"chosen": ["a kind, clear answer", "yes: 4"] * 2, "rejected": ["no", "5?"] * 2})
    trainer = RewardTrainer(model=model, processing_class=tok, train_dataset=pairs,
                            args=RewardConfig(output_dir=str(tmp_path / "rm"), per_device_train_batch_size=2,
                                              max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True,
                                              logging_steps=1, save_strategy="no", bf16=False,
                                              train_sampling_strategy="sequential"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[2] < losses[0]  # (every step sees the same two pairs)


def test_refusals(classifier_dir, tmp_path):
    """Unsupported requests are ConfigErrors naming the fix."""
    from transformers import AutoModelForTokenClassification

    with pytest.raises(ConfigError, match="auto_model=AutoModelForTokenClassification"):
        FastLanguageModel.from_pretrained(str(classifier_dir), auto_model=AutoModelForTokenClassification)
    with pytest.raises(ConfigError, match="also pass auto_model=AutoModelForSequenceClassification"):
        FastLanguageModel.from_pretrained(str(classifier_dir), num_labels=3)
    with pytest.raises(ConfigError, match="num_labels=0"):
        _classifier(classifier_dir, num_labels=0)
    with pytest.raises(ConfigError, match="num_labels=2 but id2label names 3"):
        _classifier(classifier_dir, num_labels=2, id2label={0: "a", 1: "b", 2: "c"})
    with pytest.raises(ConfigError, match="problem_type='ranking'"):
        _classifier(classifier_dir, problem_type="ranking")
    with pytest.raises(ConfigError, match="transformers fallback"):
        _classifier(classifier_dir, fast=False)
    with pytest.raises(ConfigError, match="no LM head"):
        _classifier(classifier_dir, offload_lm_head=True)
    model, _ = _classifier(classifier_dir)
    for call in (lambda: model.generate(IDS), lambda: model.save_pretrained_gguf(tmp_path / "g"),
                 lambda: model(input_ids=IDS[:1], seq_idx=torch.zeros_like(IDS[:1]))):
        with pytest.raises(ConfigError):
            call()
    model.config.pad_token_id = None
    with pytest.raises(ConfigError, match="no pad_token_id"):
        model(input_ids=IDS)
    with pytest.raises(ConfigError, match="lm_head"):
        FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["lm_head"])
    lm, _ = FastLanguageModel.from_pretrained(str(classifier_dir), dtype=torch.float32)
    with pytest.raises(ConfigError, match="without a classification head"):
        FastLanguageModel.get_peft_model(lm, r=4, modules_to_save=["score"])
    lm = FastLanguageModel.get_peft_model(lm, r=4)
    lm.save_pretrained(tmp_path / "lm_adapter")
    with pytest.raises(ConfigError, match="language-model adapter"):
        _classifier(tmp_path / "lm_adapter")


def test_families_without_a_transformers_classifier_are_refused(tmp_path):
    """Granite has no GraniteForSequenceClassification in transformers: a classifier trained here could not be
    loaded elsewhere, so it is refused by name."""
    save_hf(hf_model("granite"), tmp_path / "granite")
    with pytest.raises(ConfigError, match="granite model, for which transformers has no"):
        _classifier(tmp_path / "granite")


def test_nf4_classifier_keeps_its_head_unquantised(classifier_dir):
    """load_in_4bit quantises the decoder's linears, not the score head; scores stay close to the 16-bit model's."""
    model, _ = _classifier(classifier_dir, load_in_4bit=True)
    assert type(model.score) is torch.nn.Linear and type(model.model.layers[0].self_attn.q_proj) is not \
        torch.nn.Linear
    full, _ = _classifier(classifier_dir)
    with torch.no_grad():
        full.score.weight.copy_(model.score.weight.float())
    a, b = model(input_ids=TOK_IDS, attention_mask=MASK).logits, full(input_ids=TOK_IDS, attention_mask=MASK).logits
    assert (a - b).abs().max() < 0.1 * b.abs().max() + 1e-3


def test_missing_head_in_a_seq_cls_adapter_is_named(classifier_dir, tmp_path):
    """A SEQ_CLS adapter without its score head is a ModelLoadError naming the key."""
    from safetensors.torch import load_file, save_file

    model, tok = _classifier(classifier_dir)
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.save_pretrained(tmp_path / "a", tokenizer=tok)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del tensors["base_model.model.score.weight"]
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="base_model.model.score.weight"):
        FastLanguageModel.from_pretrained(str(tmp_path / "a"))


def test_export_command_writes_a_classifier(classifier_dir, tmp_path, capsys):
    """`fasttune export --format merged` on a classifier adapter names the classification auto class; nf4 keeps the
    head 16-bit (llm_int8_skip_modules ["score"]) and loads back as the classifier that the 16-bit export loaded
    with load_in_4bit is; --format gguf is refused by name."""
    from fasttune.cli import main

    model, tok = _classifier(classifier_dir)
    model = FastLanguageModel.get_peft_model(model, r=4)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter", tokenizer=tok)
    for quant, folder in ((["--quantization", "nf4"], "m4"), ([], "m16")):
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "merged", *quant,
                     "--output", str(tmp_path / folder)]) == 0
        assert "AutoModelForSequenceClassification" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "m4" / "config.json").read_text())
    assert cfg["quantization_config"]["llm_int8_skip_modules"] == ["score"]
    back, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"), dtype=torch.float32)
    assert back.is_sequence_classifier and type(back.score) is torch.nn.Linear
    want, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m16"), dtype=torch.float32, load_in_4bit=True)
    torch.testing.assert_close(back(input_ids=TOK_IDS, attention_mask=MASK).logits,
                               want(input_ids=TOK_IDS, attention_mask=MASK).logits, rtol=1e-5, atol=1e-6)
    rc = main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--output",
               str(tmp_path / "x.gguf")])
    assert rc != 0 and "sequence classifier" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("fixture, text_class", [("qwen3_5_vl_dir", "Qwen3_5TextForSequenceClassification"),
                                                 ("gemma3_vl_dir", "Gemma3TextForSequenceClassification")])
def test_vision_language_checkpoint_as_text_classifier(request, fixture, text_class, tmp_path):
    """A Qwen3.5 / Gemma 3 vision-language checkpoint loads as a text classifier: on text its scores equal
    transformers' vision-language classifier of the checkpoint, and the merged save is transformers' text
    classifier with the same scores. A checkpoint saved as a vision-language classifier is refused by name."""
    folder = request.getfixturevalue(fixture)
    ours, tok = load_classifier(folder)
    assert ours.config.architectures == [text_class] and not hasattr(ours, "family")
    ref = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=3, dtype=torch.float32).eval()
    ref.config.get_text_config().pad_token_id = ours.config.pad_token_id
    with torch.no_grad():
        ref.score.weight.copy_(ours.score.weight)
    batch = tok(["a short one", "a longer line of text here"], padding=True, return_tensors="pt")
    want = ours(**batch).logits
    torch.testing.assert_close(want, ref(**batch).logits, rtol=1e-5, atol=1e-5)
    ours.save_pretrained_merged(tmp_path / "m", tok)
    text = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert type(text).__name__ == text_class
    torch.testing.assert_close(text(**batch).logits, want, rtol=1e-5, atol=1e-5)
    ref.save_pretrained(tmp_path / "vl_classifier")
    with pytest.raises(ConfigError, match="vision-language sequence classifier"):
        FastLanguageModel.from_pretrained(str(tmp_path / "vl_classifier"))
