"""Granite 4.0 (transformers' GraniteMoeHybrid) on our decoder: Mamba-2 layers (models/mamba2.py) beside attention
layers, the shared MLP under its names, Granite's multipliers. The family tests (tests/tiny.py's FAMILIES: Granite
4.0-H's NoPE layout) cover logits, LoRA gradients against PEFT, generation, merging and GGUF in llama.cpp; here what
is Granite 4.0's own."""
import warnings

import pytest
import torch
from peft_oracle import (assert_grads_close, check_logits_generation_and_merged, check_packed_documents,
                         check_recompute_gradients, moe_adapter_grads)
from tiny import saved_pair

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.config import ModelConfig

# config.json as IBM's granite-4.0-h-micro ships it (sizes shrunk): the original layer names and NoPE
ORIGINAL = dict(model_type="granitemoehybrid", vocab_size=300, hidden_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, shared_intermediate_size=96, num_local_experts=0,
                layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8, mamba_d_head=16,
                mamba_n_groups=2, mamba_d_state=8, mamba_expand=2, mamba_d_conv=4, mamba_conv_bias=True,
                mamba_proj_bias=False, position_embedding_type="nope", attention_multiplier=0.0078125,
                embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0, rms_norm_eps=1e-5)


def _pair(folder, tokenizer, family="granitemoehybrid", **overrides):
    """transformers' tiny Granite 4.0 (`overrides` on tests/tiny.py's `family`, its Mamba parameters drawn there) and
    ours loaded from it in fp32."""
    return saved_pair(family, folder, tokenizer, **overrides)


def test_fields_from_the_original_config_json():
    arch = ModelConfig.from_hf(ORIGINAL)
    assert arch.linear_layers == [True, False, True, True] and arch.linear_kind == "mamba2"
    assert (arch.mamba_heads, arch.mamba_head_dim, arch.mamba_groups, arch.mamba_state) == (8, 16, 2, 8)
    assert arch.rope_layers == [False] * 4 and arch.intermediate_size == 96 and arch.fused_gate_up
    assert (arch.embedding_multiplier, arch.residual_multiplier, arch.logits_scaling) == (12.0, 0.22, 8.0)
    assert arch.scaling == 0.0078125 and arch.conv_bias and arch.time_step_limit == (0.0, float("inf"))
    auto = ModelConfig.from_hf({**ORIGINAL, "mamba_d_head": "auto", "position_embedding_type": "rope"})
    assert auto.mamba_head_dim == 16 and not auto.rope_layers  # (expand 2 x 64 / 8 heads; RoPE everywhere)
    assert ModelConfig.from_hf({**ORIGINAL, "layer_types": None}).linear_layers == [True] * 4  # transformers' default


@pytest.mark.parametrize("change, match", [
    ({"layer_types": ["mamba", "moe", "mamba", "mamba"]}, "must name 'mamba' or 'attention'"),
    ({"mamba_d_head": 12}, "Mamba sizes do not fit"),
    ({"mamba_n_groups": 3}, "must divide mamba_n_heads")])
def test_bad_configs_are_load_errors(change, match):
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_hf({**ORIGINAL, **change})


@pytest.mark.parametrize("overrides", [
    {"position_embedding_type": "rope", "time_step_limit": (0.05, 0.6)},  # RoPE attention; clamped steps
    {"layer_types": ["full_attention"] * 4, "position_embedding_type": "rope"}],  # granite-4.0-micro: no Mamba
    ids=["rope-clamped", "all-attention"])
def test_logits_generation_and_merged_equal_transformers(overrides, tmp_path, tiny_tokenizer):
    check_logits_generation_and_merged(*_pair(tmp_path / "m", tiny_tokenizer, **overrides), 70, tmp_path)


def test_packed_documents_do_not_share_a_state(tmp_path, tiny_tokenizer):
    """Two documents packed in one row (positions restarting at 0) give each document's logits alone: each starts
    the Mamba layers from a zero state and conv history, as the attention layer attends within it."""
    check_packed_documents(_pair(tmp_path / "m", tiny_tokenizer)[1])


def test_recompute_gives_the_same_gradients(tmp_path, tiny_tokenizer):
    _pair(tmp_path / "m", tiny_tokenizer)
    check_recompute_gradients(tmp_path / "m")


def test_the_peers_notebook_targets_adapt_attention_and_the_shared_mlp(tmp_path, tiny_tokenizer):
    """The peer's Granite 4.0 notebook passes Llama's seven names and shared_mlp.input_linear / output_linear: the
    dotted names select by suffix (PEFT's rule), the Llama MLP names Granite lacks are skipped with a warning."""
    _, model = _pair(tmp_path / "m", tiny_tokenizer)
    with pytest.warns(UserWarning, match=r"\['down_proj', 'gate_proj', 'up_proj'\] match no layer"):
        lora = FastLanguageModel.get_peft_model(
            model, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                        "shared_mlp.input_linear", "shared_mlp.output_linear"])
    adapted = {n.split(".lora_")[0] for n, p in lora.named_parameters() if p.requires_grad}
    assert len(adapted) == 4 + 4 * 2 and "model.layers.2.shared_mlp.input_linear" in adapted
    default = FastLanguageModel.get_peft_model(_pair(tmp_path / "n", tiny_tokenizer)[1], r=4)
    assert sorted(default.lora_settings.target_modules) == ["in_proj", "input_linear", "k_proj", "o_proj",
                                                            "out_proj", "output_linear", "q_proj", "v_proj"]


@pytest.fixture
def moe_pair(tmp_path, tiny_tokenizer):
    """Granite 4.0-H Tiny's layout (tests/tiny.py: 4 experts beside the shared MLP in every layer) and ours."""
    return _pair(tmp_path / "moe", tiny_tokenizer, family="granitemoehybrid_moe")


def test_moe_fields_logits_generation_and_merged_equal_transformers(moe_pair, tmp_path):
    arch = moe_pair[1].arch
    assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size, arch.intermediate_size) == \
        (4, 2, 48, 96) and arch.moe_name == "block_sparse_moe" and all(arch.moe_layers)
    layer = moe_pair[1].model.layers[0]
    assert layer.block_sparse_moe.router.weight.shape == (4, 64) and layer.shared_mlp.gate_up.weight.shape == (192, 64)
    check_logits_generation_and_merged(*moe_pair, 30, tmp_path)


def test_moe_lora_equals_peft_and_adapts_the_routed_experts_by_default(moe_pair, tmp_path):
    """PEFT maps no MLP names on this family: the names adapt attention, the shared MLP and the Mamba projections,
    and without target_modules the routed experts come as target_parameters (PEFT's names), as on LFM2-MoE."""
    ours = FastLanguageModel.get_peft_model(moe_pair[1], r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert ours.lora_settings.target_parameters == ["block_sparse_moe.experts.down_proj",
                                                    "block_sparse_moe.experts.gate_up_proj"]
    mine, theirs = moe_adapter_grads("granitemoehybrid_moe", ours, tmp_path)
    assert mine.keys() == theirs.keys()
    assert any(".block_sparse_moe.experts." in n for n in mine) and any(".shared_mlp.input_linear." in n for n in mine)
    assert any(".mamba.in_proj." in n for n in mine)
    assert_grads_close(mine, theirs)


def test_moe_recompute_gives_the_same_gradients(moe_pair, tmp_path):
    check_recompute_gradients(tmp_path / "moe")


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path, tiny_tokenizer):
    """llama.cpp's granitehybrid asserts Mamba layers twice the model's width and reads no biases."""
    for overrides, match in (({"mamba_expand": 1, "mamba_n_heads": 4}, "mamba_expand 1"),
                             ({"mamba_proj_bias": True}, "biases")):
        _, model = _pair(tmp_path / "m", tiny_tokenizer, **overrides)
        with pytest.raises(ConfigError, match=match):
            model.save_pretrained_gguf(tmp_path / "m.gguf", quantization_method="f16", progress=False)
        assert not (tmp_path / "m.gguf").exists()


def test_gguf_warns_of_a_time_step_limit_it_cannot_carry(tmp_path):
    """llama.cpp reads no time_step_limit (and clamps no step): a clamped model's file is written with a warning
    naming the field; the default (0, inf) writes without one."""
    from llama_cpp_check import lora_merged_gguf

    with pytest.warns(UserWarning, match=r"time_step_limit=\(0.05, 0.6\) is not carried"):
        path = lora_merged_gguf("granitemoehybrid", tmp_path / "c", time_step_limit=(0.05, 0.6))[2]
    assert path.stat().st_size > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="time_step_limit")
        lora_merged_gguf("granitemoehybrid", tmp_path / "d")


def test_loads_in_4bit_and_trains(tmp_path, tiny_tokenizer):
    """QLoRA: the Mamba projections and the shared MLP load in NF4 like the attention's, and LoRA on them trains."""
    pytest.importorskip("bitsandbytes")
    from tiny import lora_losses

    from fasttune.peft.lora_layer import is_quantized

    _pair(tmp_path / "m", tiny_tokenizer)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), load_in_4bit=True)
    assert is_quantized(model.model.layers[0].mamba.in_proj) and is_quantized(model.model.layers[1].shared_mlp.gate_up)
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = lora_losses(model, ids, steps=4)
    assert losses[-1] < losses[0]


def test_moe_gguf_logits_match_llama_cpp(tmp_path):
    """Granite 4.0-H Tiny's layout in llama.cpp's granitehybrid: the experts as ffn_*_exps, the router as
    ffn_gate_inp, the shared MLP as ffn_*_shexp; LoRA merged into attention, Mamba and shared MLP layers."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_check import PROMPTS, compare_logits, lora_merged_gguf

    model, tok, path, reader = lora_merged_gguf("granitemoehybrid_moe", tmp_path)
    names = {t.name for t in reader.tensors}
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate_inp.weight", "blk.0.ffn_down_shexp.weight",
            "blk.0.ssm_in.weight"} <= names and "blk.0.ffn_gate.weight" not in names
    assert reader.fields["granitehybrid.expert_shared_feed_forward_length"].contents() == 96
    rel, top1, _ = compare_logits(model, tok, path, PROMPTS, f32_cache=True)
    assert rel < 3e-3 and top1 == 1.0, (rel, top1)


# Granite 4.0's chat template, shortened (its roles between <|start_of_role|> / <|end_of_role|>)
GRANITE_TEMPLATE = ("{%- for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
                    "{{ message['content'] }}<|end_of_text|>\n{% endfor %}"
                    "{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{%- endif %}")


def test_the_peers_granite_notebook_flow(tmp_path, monkeypatch):
    """The peer's Granite 4.0 notebook, import changed: from_pretrained, get_peft_model with its target list,
    conversations formatted by the chat template, TRL's SFTTrainer with its SFTConfig, train_on_responses_only with the
    parts read off Granite's template, training, inference, the adapter saved and loaded back."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from fasttune import is_bfloat16_supported
    from fasttune.chat_templates import train_on_responses_only

    from tiny_tokenizer import make_tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    _pair(tmp_path / "granite", make_tiny_tokenizer(GRANITE_TEMPLATE))  # (its own: the shared one keeps ChatML)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(tmp_path / "granite"), max_seq_length=128,
                                                         load_in_4bit=False, load_in_8bit=False,
                                                         full_finetuning=False)
    with pytest.warns(UserWarning, match="match no layer"):
        model = FastLanguageModel.get_peft_model(
            model, r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                         "shared_mlp.input_linear", "shared_mlp.output_linear"],
            lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
            use_rslora=False, loftq_config=None)
    rows = [{"snippet": s, "recommendation": r} for s, r in
            [("screen is black", "toggle acceleration"), ("lock at 5%", "reinstall firmware"),
             ("blank pdf", "try another browser"), ("steps frozen", "re-pair the tracker")]]

    def formatting_prompts_func(examples):
        messages = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                    for u, a in zip(examples["snippet"], examples["recommendation"])]
        return {"text": [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=False)
                         for m in messages]}

    dataset = Dataset.from_list(rows).map(formatting_prompts_func, batched=True)
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=trl.SFTConfig(
        dataset_text_field="text", per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=0,
        max_steps=3, learning_rate=2e-3, logging_steps=1, weight_decay=0.001, lr_scheduler_type="linear",
        seed=3407, output_dir="outputs", report_to="none",
        bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported(),  # (TRL refuses its bf16 default on a CPU)
        # TRL 1.16 turns its MoE loss on for any config with output_router_logits (Granite's dense ones too), then
        # reads config.num_experts, which Granite names num_local_experts: it fails on transformers' model alike
        router_aux_loss_coef=0.0))
    trainer = train_on_responses_only(trainer)  # (the parts read off Granite's template)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kept = batch["labels"][0] != -100
    assert tokenizer.decode(batch["input_ids"][0][kept]).startswith("toggle acceleration<|end_of_text|>")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "screen is black"}], tokenize=True,
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=6, use_cache=True, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    model.save_pretrained("granite_lora")
    tokenizer.save_pretrained("granite_lora")
    reloaded, _ = FastLanguageModel.from_pretrained(model_name="granite_lora", max_seq_length=128)
    FastLanguageModel.for_inference(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(out).logits, model(out).logits, atol=1e-4, rtol=0)
