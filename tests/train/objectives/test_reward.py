"""RewardTrainer (train/objectives/reward.py) against TRL's RewardTrainer on the same model and rows: per-step losses,
the margin column, the centring term; gradient accumulation; rows, models and configs it refuses; the CLI."""
import json

import pytest
import torch
from fasttune import FastLanguageModel, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from fasttune.cli import main
from fasttune.errors import ConfigError, DataError
from tiny import hf_model, load_classifier, save_hf

ROWS = [{"prompt": "Is 2+2 4?", "chosen": " Yes, it is.", "rejected": " No.", "margin": 0.5},
        {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Lyon, I think", "margin": 1.0},
        {"prompt": "Say hi", "chosen": " Hi there!", "rejected": " bye", "margin": 0.0},
        {"prompt": "3*3?", "chosen": " 9", "rejected": " 6 or so", "margin": 2.0}]
CHAT = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
        for r in ROWS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("reward") / "llama"
    save_hf(hf_model("llama"), folder, tiny_tokenizer)
    return folder


def _reward_model(folder, num_labels=1):
    return load_classifier(folder, num_labels, lora_r=4)


def _ours(folder, rows, out, **config):
    model, tok = _reward_model(folder)
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                        max_steps=4, learning_rate=1e-2, logging_steps=1, shuffle=False, **config)
    trainer = RewardTrainer(model=model, processing_class=tok, train_dataset=rows, args=args)
    trainer.train()
    return [h["loss"] for h in trainer.log_history if "loss" in h], trainer


def _trl(folder, rows, tmp_path, **config):
    import datasets
    import trl

    model, tok = _reward_model(folder)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=4,
                            learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                            lr_scheduler_type="linear", seed=3407, train_sampling_strategy="sequential",
                            optim="adamw_torch", bf16=False, **config)  # (TRL turns bf16 on when None)
    trainer = trl.RewardTrainer(model=model, processing_class=tok, args=args,
                                train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("rows, config", [(ROWS, {}), (CHAT, {"center_rewards_coefficient": 0.1})],
                         ids=["text-with-margin", "chat-centred"])
def test_losses_equal_trl_reward_trainer(base_dir, tmp_path, rows, config):
    """Per-step losses equal TRL's RewardTrainer on the same model, rows and schedule (the margin column and the
    centring term included)."""
    ours, trainer = _ours(base_dir, rows, tmp_path / "ours", **config)
    theirs = _trl(base_dir, rows, tmp_path, **config)
    assert len(ours) == 4 and ours[2] < ours[0]  # (steps 1 and 3 see the same pairs)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-5)
    logged = trainer.log_history[0]
    assert {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= set(logged)


def test_accumulation_gives_the_whole_batch_mean(base_dir, tmp_path):
    """Two micro-batches of one pair take the optimizer to where one batch of two pairs does (SGD, one step)."""
    def trained(bs, accumulation):
        model, tok = _reward_model(base_dir)
        args = RewardConfig(output_dir=str(tmp_path / f"r{bs}"), per_device_train_batch_size=bs, max_steps=1,
                            optim="sgd", gradient_accumulation_steps=accumulation, learning_rate=0.5, shuffle=False)
        RewardTrainer(model=model, processing_class=tok, train_dataset=ROWS[:2], args=args).train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    one, two = trained(2, 1), trained(1, 2)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=1e-7, msg=n)


def test_refusals(base_dir, tmp_path):
    """A language model, a classifier with several outputs, a classifier in another trainer, a bad margin and pairs
    that are all too long are named."""
    lm, tok = FastLanguageModel.from_pretrained(str(base_dir), dtype=torch.float32)
    with pytest.raises(ConfigError, match="auto_model=AutoModelForSequenceClassification, num_labels=1"):
        RewardTrainer(model=lm, processing_class=tok, train_dataset=ROWS)
    three, tok = _reward_model(base_dir, num_labels=3)
    with pytest.raises(ConfigError, match="num_labels=3"):
        RewardTrainer(model=three, processing_class=tok, train_dataset=ROWS)
    one, tok = _reward_model(base_dir)
    with pytest.raises(ConfigError, match="SFTTrainer trains language models"):
        SFTTrainer(model=one, processing_class=tok, train_dataset=[{"text": "hello"}], args=SFTConfig())
    bad = [dict(ROWS[0]), dict(ROWS[1], margin="big")]
    with pytest.raises(DataError, match="Row 1.*'margin'"):
        RewardTrainer(model=one, processing_class=tok, train_dataset=bad)
    with pytest.raises(DataError, match="every row is longer than max_seq_length=8"):
        RewardTrainer(model=one, processing_class=tok, train_dataset=ROWS, args=RewardConfig(max_seq_length=8))
    with pytest.warns(UserWarning, match="Dropped 1 of 2 rows"):
        trainer = RewardTrainer(model=one, processing_class=tok, args=RewardConfig(max_seq_length=30),
                                train_dataset=[ROWS[2], dict(ROWS[0], chosen=" yes" * 20)])
    assert len(trainer.train_examples) == 1
    with pytest.raises(ConfigError, match="center_rewards_coefficient=-1"):
        RewardConfig(center_rewards_coefficient=-1.0)


def test_cli_trains_a_reward_model(base_dir, tmp_path, capsys):
    """`fasttune train --method reward` loads the model with a one-output head and writes a SEQ_CLS adapter that
    loads back as a reward model."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "out"
    rc = main(["train", "--method", "reward", "--model", str(base_dir), "--data", str(data), "--output-dir",
               str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2] and "accuracy" in log[0]
    model, _ = FastLanguageModel.from_pretrained(str(out / "adapter"), dtype=torch.float32)
    assert model.is_sequence_classifier and model.config.num_labels == 1


def test_resume_continues_the_run(base_dir, tmp_path):
    """A reward-model run resumed from its step-2 checkpoint ends where the uninterrupted run ends: the same per-step
    losses and the same score head (a module to save, in the checkpoint with the LoRA weights)."""
    import shutil

    def run(resume=None):
        model, tok = _reward_model(base_dir)
        args = RewardConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4,
                            gradient_accumulation_steps=1, save_steps=2, learning_rate=1e-2, shuffle=False,
                            logging_steps=1)
        trainer = RewardTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=args)
        trainer.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in trainer.log_history if "loss" in h], model.score.weight.detach().clone()

    whole, head = run()
    shutil.rmtree(tmp_path / "out" / "checkpoint-4")
    resumed, resumed_head = run(resume=True)
    assert resumed == whole and torch.equal(resumed_head, head)
