"""GRPO with a reward model among the reward functions (train/reward_models.py): the rewards and advantages equal TRL
1.16's GRPOTrainer's with the same sequence classifier and tokenizer (string and chat prompts), fasttune's own
classifier of the same weights scores the same, and the errors are named."""
import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS, G, count_a, fixed_completions_trl
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel, GRPOConfig, GRPOTrainer
from fasttune.errors import ConfigError

trl = pytest.importorskip("trl")
CHAT_ROWS = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    """A tiny policy and a tiny one-output Llama classifier (the reward model, saved as "tiny-rm")."""
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("grpo_rm")
    save_hf(hf_model("llama", seed=0), root / "policy", tiny_tokenizer)
    config = hf_model("llama", seed=1).config
    config.num_labels, config.pad_token_id = 1, tiny_tokenizer.pad_token_id
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(root / "tiny-rm")
    tiny_tokenizer.save_pretrained(root / "tiny-rm")
    return root


def _reward_model(folders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(folders / "tiny-rm", dtype=torch.float32)
    return rm, AutoTokenizer.from_pretrained(folders / "tiny-rm")


def _ours(folders, tmp_path, rows, funcs, processing_classes):
    model, tok = FastLanguageModel.from_pretrained(str(folders / "policy"), dtype="float32")
    args = GRPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=len(COMPLETIONS),
                      gradient_accumulation_steps=1, num_generations=G, max_completion_length=6, shuffle=False)
    trainer = GRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=rows, processing_class=tok,
                          reward_processing_classes=processing_classes)
    examples = trainer.train_examples[:len(COMPLETIONS)]
    return trainer, trainer.score(examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]


@pytest.mark.parametrize("rows", [ROWS, CHAT_ROWS], ids=["strings", "chat"])
def test_rewards_equal_trl(folders, tmp_path, tiny_tokenizer, rows):
    from datasets import Dataset

    rm, rm_tok = _reward_model(folders)
    trainer, batch = _ours(folders, tmp_path, rows, [rm, count_a], [rm_tok, None])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(COMPLETIONS),
                          num_generations=G, max_completion_length=6, use_cpu=True, report_to="none", bf16=False)
    theirs = fixed_completions_trl()(model=hf_model("llama", seed=0).train(), reward_funcs=[rm, count_a], args=args,
                                 train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
                                 reward_processing_classes=[rm_tok, None])
    want = theirs._generate_and_score_completions([row for row in rows for _ in range(G)])
    assert trainer.reward_names == ["tiny-rm", "count_a"]
    torch.testing.assert_close(batch["advantages"], want["advantages"], rtol=1e-5, atol=1e-6)
    assert batch["advantages"].abs().sum() > 0
    mine, m = trainer._metrics, theirs._metrics["train"]
    for name in ("rewards/tiny-rm/mean", "rewards/tiny-rm/std", "reward"):
        assert mine[name][-1] == pytest.approx(m[name][-1], rel=1e-5, abs=1e-6), name


def test_fasttune_classifier_scores_the_same(folders, tmp_path):
    """The reward model loaded by fasttune (its SequenceClassifier; its tokenizer found beside the weights when
    reward_processing_classes is left out) gives transformers' rewards."""
    from transformers import AutoModelForSequenceClassification

    rm, rm_tok = _reward_model(folders)
    ours_rm, _ = FastLanguageModel.from_pretrained(str(folders / "tiny-rm"), dtype="float32",
                                                   auto_model=AutoModelForSequenceClassification, num_labels=1)
    want, _ = _ours(folders, tmp_path, ROWS, [rm], [rm_tok])
    got, _ = _ours(folders, tmp_path, ROWS, [ours_rm], None)
    torch.testing.assert_close(torch.tensor(got._metrics["rewards/tiny-rm/mean"]),
                               torch.tensor(want._metrics["rewards/tiny-rm/mean"]), rtol=1e-5, atol=1e-6)


def test_errors(folders, tmp_path):
    from transformers import LlamaForSequenceClassification

    rm, rm_tok = _reward_model(folders)
    with pytest.raises(ConfigError, match="reward_processing_classes has 1 entries for 2 reward functions"):
        _ours(folders, tmp_path, ROWS, [rm, count_a], [rm_tok])
    config = hf_model("llama", seed=1).config
    config.num_labels = 1
    with pytest.raises(ConfigError, match="has no tokenizer: pass it in reward_processing_classes"):
        _ours(folders, tmp_path, ROWS, [LlamaForSequenceClassification(config)], None)


def test_a_reward_model_by_its_folder(folders, tmp_path, capsys):
    """reward_funcs "model:<folder>" (also the CLI's --reward-funcs) loads the saved classifier and its tokenizer
    and scores as the loaded object does; a folder that is missing or holds a language model is named."""
    import json

    from fasttune.cli import main

    rm, rm_tok = _reward_model(folders)
    want, _ = _ours(folders, tmp_path, ROWS, [rm], [rm_tok])
    got, _ = _ours(folders, tmp_path, ROWS, [f"model:{folders / 'tiny-rm'}"], None)
    assert got.reward_names == ["tiny-rm"]
    torch.testing.assert_close(torch.tensor(got._metrics["rewards/tiny-rm/mean"]),
                               torch.tensor(want._metrics["rewards/tiny-rm/mean"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="'model:nowhere' names no folder"):
        GRPOConfig(output_dir=str(tmp_path), reward_funcs=["model:nowhere"])
    with pytest.raises(ConfigError, match="holds a language model, not a reward model"):
        _ours(folders, tmp_path, ROWS, [f"model:{folders / 'policy'}"], None)
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    rc = main(["train", "--method", "grpo", "--model", str(folders / "policy"), "--data",
               str(tmp_path / "prompts.jsonl"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
               "--lora-r", "4", "--batch-size", "4", "--grad-accum", "1", "--num-generations", "4",
               "--max-completion-length", "4",
               "--reward-funcs", f"model:{folders / 'tiny-rm'},length", "--no-sample", "--log-completions"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "completions" / "completions_00001.parquet").exists()  # --log-completions


def test_reward_model_texts_take_chat_template_kwargs(folders, tmp_path):
    """chat_template_kwargs reach the reward model's template too (TRL renders its texts with them)."""
    rm, rm_tok = _reward_model(folders)
    rm_tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ mark }}\n{% endfor %}"
    model, tok = FastLanguageModel.from_pretrained(str(folders / "policy"), dtype="float32")
    args = GRPOConfig(output_dir=str(tmp_path / "k"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      num_generations=4, max_completion_length=4, chat_template_kwargs={"mark": "!"})
    trainer = GRPOTrainer(model, reward_funcs=[rm], args=args, train_dataset=CHAT_ROWS, processing_class=tok,
                          reward_processing_classes=[rm_tok])
    texts = trainer.reward_funcs[0].texts([CHAT_ROWS[0]["prompt"]], [[{"role": "assistant", "content": "ab"}]])
    assert texts == [f"user: {ROWS[0]['prompt']}!\nassistant: ab!\n"]
