"""train/config_names.py: settings written for TRL's and transformers' configs work with the import changed, or fail
with a ConfigError naming the setting (not Python's TypeError)."""
import pytest

from fasttune import DPOConfig, SFTConfig
from fasttune.errors import ConfigError


def test_trl_names_translate_and_bookkeeping_is_accepted():
    c = SFTConfig(output_dir="o", max_length=512, gradient_checkpointing=True, save_strategy="steps", save_steps=5,
                  eval_strategy="no", run_name="r", logging_dir="logs", dataloader_num_workers=2,
                  remove_unused_columns=False, push_to_hub=False, completion_only_loss=None)
    assert (c.max_seq_length, c.save_steps) == (512, 5)
    assert SFTConfig(save_strategy="no", save_steps=10).save_steps == 0
    assert DPOConfig(output_dir="o", max_length=256).max_seq_length == 256


@pytest.mark.parametrize("kw, match", [
    (dict(push_to_hub=True), "push_to_hub=True.*upload the folder yourself"),
    (dict(save_strategy="epoch"), "save_strategy='epoch'.*save_steps=N"),
    (dict(eval_strategy="epoch"), "eval_strategy='epoch'.*eval_steps=N"),
    (dict(neftune_noise_alpha=0.0), "neftune_noise_alpha=0.0 is invalid"),
    (dict(assistant_only_loss=True, train_on_responses_only=False), "disagree"),
    (dict(max_lenght=3), "unknown setting 'max_lenght'. Did you mean 'max_seq_length'"),
    (dict(max_length=3, max_seq_length=4), "max_length and max_seq_length are the same setting"),
])
def test_unsupported_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**kw)


def _configs():
    from fasttune import (CPOConfig, DistillationConfig, GKDConfig, GMPOConfig, GRPOConfig, KTOConfig,
                          OnlineDPOConfig, ORPOConfig, RewardConfig, RLOOConfig)

    return [SFTConfig, DPOConfig, KTOConfig, GRPOConfig, ORPOConfig, CPOConfig, RLOOConfig, RewardConfig,
            DistillationConfig, GKDConfig, GMPOConfig, OnlineDPOConfig]


@pytest.mark.parametrize("cls", _configs(), ids=lambda c: c.__name__)
def test_every_upstream_setting_is_accepted_at_its_default(cls):
    """Every field of transformers' TrainingArguments and of TRL's config of the same name, as installed, given at
    its own default: a script that spells out defaults runs with only the import changed."""
    from fasttune.train.config_names import upstream_defaults

    owners = upstream_defaults(cls)
    assert owners[0][0] == "transformers' TrainingArguments" and len(owners[0][1]) > 100
    # TRL 1.x keeps ORPO, CPO, GKD, GMPO and online DPO in trl.experimental
    experimental = ("ORPOConfig", "CPOConfig", "GKDConfig", "GMPOConfig", "OnlineDPOConfig")
    where = "TRL's experimental" if cls.__name__ in experimental else "TRL's"
    assert len(owners) == 2 and owners[1][0] == f"{where} {cls.__name__}"
    refused = []
    for owner, defaults in owners:
        for name, default in defaults.items():
            try:
                cls(**{"output_dir": "o", name: default})
            except ConfigError as e:
                refused.append(f"{owner}.{name}={default!r}: {e}")
    assert refused == []


@pytest.mark.parametrize("cls, kw, match", [
    (SFTConfig, dict(optim_target_modules=["attn"]),
     r"does not implement transformers' TrainingArguments\.optim_target_modules; leave it at its default \(None\)"),
    (SFTConfig, dict(truncation_mode="keep_end"),
     r"does not implement TRL's SFTConfig\.truncation_mode; leave it at its default \('keep_start'\)"),
    (SFTConfig, dict(packing_strategy="wrapped"), r"TRL's SFTConfig\.packing_strategy.*'bfd'"),
    ("GRPOConfig", dict(ds3_gather_for_generation=False),
     r"TRL's GRPOConfig\.ds3_gather_for_generation; leave it at its default \(True\)"),
    ("GRPOConfig", dict(loss_type=["dapo", "grpo"]), r"one loss at a time \(DPOConfig takes TRL's weighted list\)"),
    (DPOConfig, dict(label_smoothing_factor=0.1), "label smoothing is applied in supervised fine-tuning"),
    (SFTConfig, dict(label_smoothing_factor=1.0), r"label_smoothing_factor=1.0 is invalid.*\[0, 1\)"),
    (SFTConfig, dict(label_smoothing_factor=0.1, loss_type="dft"), "do not combine"),
    (SFTConfig, dict(use_cpu=True), "CUDA_VISIBLE_DEVICES="),
    (SFTConfig, dict(deepspeed="ds.json"), "torchrun"),
    (SFTConfig, dict(activation_offloading=True), "use_gradient_checkpointing='offload'"),
    (SFTConfig, dict(trust_remote_code=True), "runs no code from model folders"),
    (SFTConfig, dict(metric_for_best_model="eval_loss"), "tracks no best one"),
    (SFTConfig, dict(fsdp="hybrid_shard auto_wrap"), r"hybrid_shard is not implemented\. Use fsdp=True"),
    (SFTConfig, dict(train_sampling_strategy="batch_rebalance"), "'random'.*'sequential'.*'group_by_length'"),
    (SFTConfig, dict(train_sampling_strategy="group_by_length", group_by_length=False), "disagree"),
    (SFTConfig, dict(group_by_length=True, shuffle=False), "give one"),
    ("GRPOConfig", dict(train_sampling_strategy="group_by_length"), "does not apply to GRPOConfig"),
    (SFTConfig, dict(train_sampling_strategy="random", shuffle=False), "disagree"),
    (SFTConfig, dict(warmup_steps=0.1, warmup_ratio=0.2), "same setting"),
    (SFTConfig, dict(use_vlm=True), r"unknown setting 'use_vlm'"),
])
def test_settings_fasttune_does_not_implement_name_their_owner_and_fix(cls, kw, match):
    if isinstance(cls, str):
        import fasttune

        cls = getattr(fasttune, cls)
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


def test_upstream_values_translate():
    c = SFTConfig(output_dir=None, fsdp="full_shard auto_wrap", train_sampling_strategy="sequential",
                  warmup_steps=0.05, tf32=True, data_seed=11, dataloader_drop_last=False, ddp_timeout=600,
                  eval_accumulation_steps=4, pad_to_multiple_of=8)
    assert (c.output_dir, c.fsdp, c.shuffle, c.warmup_ratio, c.warmup_steps, c.tf32, c.data_seed) == \
        ("outputs", True, False, 0.05, 0, True, 11)
    assert SFTConfig(fsdp="").fsdp is False and SFTConfig(fsdp=None).fsdp is False
    assert DPOConfig(loss_type=["ipo"]).loss_type == "ipo"
    assert SFTConfig(assistant_only_loss=True).train_on_responses_only is True
    assert SFTConfig(padding_free=True, assistant_only_loss=False).train_on_responses_only is False
    # settings that change nothing fasttune computes are dropped at any value
    assert DPOConfig(precompute_ref_batch_size=8).beta == 0.1
    import fasttune
    g = fasttune.GRPOConfig(cache_implementation="static", log_multimodal=False,
                            transformers_continuous_batching_config={"max_batch_tokens": 256})
    assert not hasattr(g, "cache_implementation") and not hasattr(g, "log_multimodal")


def test_chat_template_path(tmp_path):
    import json

    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(jinja)
    assert SFTConfig(chat_template_path=str(tmp_path / "t.jinja")).chat_template == jinja
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": jinja}]}))
    assert SFTConfig(chat_template_path=str(folder)).chat_template == jinja
    (folder / "chat_template.jinja").write_text(jinja + " ")
    assert SFTConfig(chat_template_path=str(folder)).chat_template == jinja + " "  # the file wins, as transformers
    with pytest.raises(ConfigError, match=r"chat_template_path='.*empty' holds no chat template"):
        (tmp_path / "empty").mkdir()
        SFTConfig(chat_template_path=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="both give the chat template"):
        SFTConfig(chat_template="chatml", chat_template_path=str(tmp_path / "t.jinja"))


@pytest.mark.parametrize("kw, match", [
    (dict(lr_scheduler_type="cosine_with_min_lr"), r"cosine_with_min_lr.*One of min_lr or min_lr_rate"),
    (dict(lr_scheduler_kwargs={"min_lr": 1e-6}), r"'linear'.*unexpected keyword argument 'min_lr'"),
    (dict(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"lr_end": 1.0}, learning_rate=1e-4),
     r"lr_end \(1\.0\) must be smaller than initial lr"),
    (dict(lr_scheduler_kwargs="{min_lr: 1}"), r"is not valid JSON .*give an object"),
    (dict(lr_scheduler_kwargs=[1]), "must be a mapping"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), "follows an evaluation metric"),
    (dict(lr_scheduler_type="cosine_decay"), r"not supported; use one of \('linear'"),
])
def test_schedule_keywords_are_checked_with_the_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**kw)


def test_schedule_keywords_from_json_text():
    c = SFTConfig(lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs='{"num_decay_steps": 3}')
    assert c.lr_scheduler_kwargs == {"num_decay_steps": 3}


def test_use_vllm_samples_with_fasttunes_generate():
    """GRPO / RLOO scripts written for TRL's vLLM (or transformers' paged / continuous-batching) sampling run: those
    settings are accepted, with a warning that fasttune's own generate() samples; other configs do not know them."""
    from fasttune import GRPOConfig, RLOOConfig

    for cls in (GRPOConfig, RLOOConfig):
        with pytest.warns(UserWarning, match=r"use_vllm=True\): fasttune samples the completions with its own"):
            cls(output_dir="o", use_vllm=True, vllm_mode="server", vllm_gpu_memory_utilization=0.3)
        for engine in ("use_transformers_paged", "use_transformers_continuous_batching"):  # TRL's other engines
            with pytest.warns(UserWarning, match=rf"{engine}=True\): fasttune samples .* transformers' "):
                cls(output_dir="o", **{engine: True})
    with pytest.raises(ConfigError, match="unknown setting 'use_vllm'"):
        SFTConfig(output_dir="o", use_vllm=True)
