"""train/trl_args.py: TRL's `peft_config=` (a PEFT LoraConfig given to our trainers adds that LoRA to the base,
peft/peft_config.py) trains exactly as get_peft_model with the same settings and seed; PEFT's default targets where
target_modules=None; configs fasttune does not implement, and models that already have LoRA, are refused by name;
`model=` may be a path."""
import pytest
import torch
from peft import IA3Config, LoraConfig

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

ROWS = [{"text": f"alpha beta gamma delta {i} epsilon"} for i in range(8)]


def _args(tmp_path, name):
    return SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=3,
                     learning_rate=5e-3, lr_scheduler_type="constant", seed=7)


def test_peft_config_trains_as_get_peft_model(tiny_model_dir, tmp_path):
    folder = str(tiny_model_dir("llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                        rank_pattern={"down_proj": 8}, task_type="CAUSAL_LM")
    model, tok = FastLanguageModel.from_pretrained(folder)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "a"),
                         peft_config=config)
    settings = trainer.model.lora_settings
    assert (settings.r, settings.lora_alpha, settings.use_rslora) == (4, 8, True)
    assert settings.target_modules == ["down_proj", "q_proj", "v_proj"] and settings.rank_pattern == {"down_proj": 8}
    assert trainer.model.model.layers[0].mlp.down_proj.r == 8
    trainer.train()
    model2, tok2 = FastLanguageModel.from_pretrained(folder)
    model2 = FastLanguageModel.get_peft_model(model2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                         "down_proj"],
                                              use_rslora=True, rank_pattern={"down_proj": 8}, random_state=7)
    reference = SFTTrainer(model=model2, processing_class=tok2, train_dataset=ROWS, args=_args(tmp_path, "b"))
    reference.train()
    losses = lambda t: [h["loss"] for h in t.log_history if "loss" in h]  # noqa: E731
    assert losses(trainer) == losses(reference) and len(losses(trainer)) == 3


def test_default_targets_are_peft_defaults(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "a"),
                         peft_config={"r": 4, "lora_alpha": 8, "use_dora": True})
    assert trainer.model.lora_settings.target_modules == ["q_proj", "v_proj"] and trainer.model.lora_settings.use_dora


@pytest.mark.parametrize("config, match", [
    (LoraConfig(r=4, init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
    (LoraConfig(r=4, layers_to_transform=[0]), "layers_to_transform"),
    (IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "IA3 config"),
    ("r=4", "must be a peft.LoraConfig"),
])
def test_unsupported_configs_are_named(config, match, tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    with pytest.raises(ConfigError, match=match):
        SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "a"),
                   peft_config=config)


def test_model_with_lora_or_without_peft_default_is_refused(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "a"),
                   peft_config=LoraConfig(r=4))
    moe, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")))
    with pytest.raises(ConfigError, match="PEFT has no default for 'qwen3_moe'"):
        SFTTrainer(model=moe, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "b"),
                   peft_config=LoraConfig(r=4))


def test_dpo_trainer_takes_peft_config(tiny_model_dir, tmp_path):
    """The preference trainers pass peft_config on: the reference policy is the base (the fresh adapter's identity),
    as TRL's DPOTrainer makes it for an adapter it creates."""
    from fasttune import DPOConfig, DPOTrainer

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    rows = [{"prompt": f"alpha {i}", "chosen": " beta gamma", "rejected": " delta"} for i in range(4)]
    trainer = DPOTrainer(model=model, processing_class=tok, train_dataset=rows,
                         args=DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.model.lora_settings.target_modules == ["q_proj", "v_proj"]
    trainer.train()
    first = [h["loss"] for h in trainer.log_history if "loss" in h][0]
    assert abs(first - 0.6931) < 1e-3  # policy == reference at the start: -log sigmoid(0)


def test_model_given_by_path(tiny_model_dir, tmp_path):
    """TRL's SFTTrainer(model="path", peft_config=...): the model and its tokenizer are loaded (FastModel), the LoRA
    added; a path that does not exist is the loader's ModelLoadError."""
    from fasttune.errors import ModelLoadError

    trainer = SFTTrainer(model=str(tiny_model_dir("llama")), train_dataset=ROWS, args=_args(tmp_path, "a"),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    assert trainer.tokenizer is not None and trainer.model.lora_settings.target_modules == ["q_proj"]
    trainer.train()
    with pytest.raises(ModelLoadError):
        SFTTrainer(model=str(tmp_path / "missing"), train_dataset=ROWS, args=_args(tmp_path, "b"))



def test_other_trainer_arguments_are_accepted_unset_and_named_when_set(tiny_model_dir, tmp_path):
    """transformers' / TRL's trainer arguments fasttune does not implement: None runs, a value is a ConfigError
    with the fix; an argument no trainer has is named as unknown."""
    from fasttune import DPOTrainer

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    unset = dict(compute_metrics=None, preprocess_logits_for_metrics=None, model_init=None, compute_loss_func=None,
                 optimizer_cls_and_kwargs=None)
    SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "a"), **unset)
    with pytest.raises(ConfigError, match=r"SFTTrainer does not implement compute_loss_func: the objective's loss "
                                          r"runs fused.*; model_init: pass the model itself"):
        SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "b"),
                   compute_loss_func=lambda *a, **k: 0, model_init=lambda: model)
    with pytest.raises(ConfigError, match=r"SFTTrainer got unknown arguments \['max_seq_len'\]"):
        SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=_args(tmp_path, "c"),
                   max_seq_len=64)  # (max_seq_length, older TRL's trainer argument, is taken: see below)
    pairs = [{"prompt": "alpha", "chosen": " beta", "rejected": " gamma"}] * 2
    with pytest.raises(ConfigError, match=r"DPOTrainer does not implement compute_metrics: only SFTTrainer's "
                                          r"evaluation.*; data_collator: this trainer batches its own examples"):
        DPOTrainer(model=model, processing_class=tok, train_dataset=pairs, data_collator=lambda f: f,
                   compute_metrics=lambda p: {})
    from fasttune import GRPOConfig, GRPOTrainer  # TRL's agent rollouts: named, with the way round

    def reward(completions, **_):
        return [0.0] * len(completions)

    grpo = dict(model=model, reward_funcs=[reward], processing_class=tok, train_dataset=[{"prompt": "hi"}],
                args=GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=2, num_generations=2))
    GRPOTrainer(**grpo, tools=None, rollout_func=None, environment_factory=None)
    from fasttune import RLOOConfig, RLOOTrainer  # TRL's RLOOTrainer takes no tools: refused, GRPO named as the way

    grpo["args"] = RLOOConfig(output_dir=str(tmp_path / "r"), per_device_train_batch_size=2, num_generations=2)
    with pytest.raises(ConfigError, match=r"RLOOTrainer does not implement environment_factory: .*run in "
                                          r"GRPOTrainer.*; rollout_func: .*runs in GRPOTrainer.*; tools: .*run in "
                                          r"GRPOTrainer"):
        RLOOTrainer(**grpo, tools=[len], environment_factory=dict, rollout_func=lambda p, t: {})


def _dpo_losses(folder, tmp_path, name, lora_dropout, **cfg):
    from preference_oracle import pair_rows

    from fasttune import DPOConfig, DPOTrainer

    model, tok = FastLanguageModel.from_pretrained(folder)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=lora_dropout, random_state=3)
    trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=pair_rows(8), args=DPOConfig(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, seed=5,
        **cfg))
    probs = {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}
    trainer.train()
    return [h["loss"] for h in trainer.log_history if "loss" in h], probs


def test_disable_dropout_as_trl(tiny_model_dir, tmp_path):
    """TRL's disable_dropout (DPO, KTO, ORPO and reward models: on by default; GRPO and RLOO: off): LoRA dropout
    0.1 then trains exactly as no dropout; disable_dropout=False keeps it."""
    from fasttune import GRPOConfig, GRPOTrainer

    folder = str(tiny_model_dir("llama"))
    plain, _ = _dpo_losses(folder, tmp_path, "plain", 0.0)
    off, probs = _dpo_losses(folder, tmp_path, "off", 0.1)
    assert probs == {0.0} and off == plain
    kept, probs = _dpo_losses(folder, tmp_path, "kept", 0.1, disable_dropout=False)
    assert probs == {0.1} and kept != plain
    model, tok = FastLanguageModel.from_pretrained(folder)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1)
    grpo = GRPOTrainer(model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                       train_dataset=[{"prompt": "a b"}] * 4, processing_class=tok,
                       args=GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=4,
                                       num_generations=4, max_completion_length=2))
    assert {m.p for m in grpo.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_training_arguments_and_older_trainer_settings_become_the_config(tiny_model_dir, tmp_path):
    """The peer's Alpaca notebook: `SFTTrainer(..., dataset_text_field="text", max_seq_length=..., dataset_num_proc=2,
    packing=False, args=transformers.TrainingArguments(...))`. The TrainingArguments' settings (those off their
    defaults) and the older trainer keyword arguments become the SFTConfig, and train as that SFTConfig does; a
    setting fasttune does not implement is refused by name, as on SFTConfig itself."""
    from transformers import TrainingArguments

    folder = str(tiny_model_dir("llama"))
    rows = [{"body": row["text"]} for row in ROWS]
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=1, max_steps=3,
                    learning_rate=5e-3, weight_decay=0.01, lr_scheduler_type="linear", seed=3407, logging_steps=1)
    losses = []
    for kind in ("training_arguments", "sft_config"):
        model, tok = FastLanguageModel.from_pretrained(folder)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=3407)
        out = str(tmp_path / kind)
        if kind == "training_arguments":
            trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, dataset_text_field="body",
                                 max_seq_length=64, dataset_num_proc=2, packing=False,
                                 args=TrainingArguments(output_dir=out, report_to="none", **settings))
        else:
            trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows,
                                 args=SFTConfig(output_dir=out, dataset_text_field="body", max_seq_length=64,
                                                **settings))
        assert isinstance(trainer.args, SFTConfig) and trainer.args.gradient_accumulation_steps == 2
        assert trainer.args.dataset_text_field == "body" and trainer.args.max_seq_length == 64
        trainer.train()
        losses.append([h["loss"] for h in trainer.log_history if "loss" in h])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    model, tok = FastLanguageModel.from_pretrained(folder)
    with pytest.raises(ConfigError, match="torch_compile"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=ROWS,
                   args=TrainingArguments(output_dir=str(tmp_path / "c"), torch_compile=True))


def test_the_dpo_and_orpo_notebooks_trainer_calls(tiny_model_dir, tmp_path):
    """The peer's DPO notebook: DPOTrainer(model, ref_model=None, args=DPOConfig(...), beta=..., tokenizer=...,
    max_length=..., max_prompt_length=...) -> those settings in the DPOConfig; a separate ref_model is refused by name.
    Its ORPO notebook's ORPOConfig(max_completion_length=...) is accepted (TRL's uses it for encoder-decoders only)."""
    from fasttune import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer, PatchDPOTrainer

    PatchDPOTrainer()
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    pairs = [{"prompt": "alpha?", "chosen": " beta", "rejected": " gamma"}] * 4
    dpo = DPOTrainer(model=model, ref_model=None, args=DPOConfig(output_dir=str(tmp_path / "d"), max_steps=1),
                     beta=0.2, train_dataset=pairs, tokenizer=tok, max_length=64, max_prompt_length=32)
    assert (dpo.args.beta, dpo.args.max_seq_length, dpo.args.max_prompt_length) == (0.2, 64, 32)
    with pytest.raises(ConfigError, match="DPOTrainer does not implement ref_model"):
        DPOTrainer(model=model, ref_model=model, args=DPOConfig(output_dir=str(tmp_path / "e")), train_dataset=pairs,
                   tokenizer=tok)
    orpo = ORPOTrainer(model=model, train_dataset=pairs, tokenizer=tok,
                       args=ORPOConfig(output_dir=str(tmp_path / "o"), max_length=64, max_prompt_length=32,
                                       max_completion_length=32, beta=0.1, max_steps=1))
    assert orpo.args.max_completion_length == 32 and orpo.train()["global_step"] == 1


def test_trls_own_sft_config_becomes_ours(tiny_model_dir, tmp_path):
    """args=trl.SFTConfig(...) given to fasttune's SFTTrainer: its settings off TRL's defaults become the SFTConfig
    (TRL's max_length is our max_seq_length; bf16 at TRL's default is not carried over)."""
    trl = pytest.importorskip("trl")
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ROWS, args=trl.SFTConfig(
        output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2, max_length=64, report_to="none",
        learning_rate=1e-3, bf16=False))
    a = trainer.args
    assert isinstance(a, SFTConfig) and (a.max_seq_length, a.max_steps, a.learning_rate, a.bf16) == (64, 2, 1e-3, False)
    assert trainer.train()["global_step"] == 2
