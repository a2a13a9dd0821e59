"""The transformers+PEFT fallback: architectures outside our decoder (GPT-2, OPT) train with one warning, their
adapters are PEFT's and load back; fast=False on llama gives the fast path's losses (a check of both paths)."""
import warnings

import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError, ModelLoadError
from fasttune.models.fallback import FallbackModel, FallbackWarning


def _rows(n=8):
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    return [{"text": " ".join(words[(i + j) % 5] for j in range(2 + i % 4))} for i in range(n)]


def _tiny_hf(family):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    ids = dict(vocab_size=300, bos_token_id=1, eos_token_id=256, pad_token_id=256)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    return OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                                    word_embed_proj_dim=32, max_position_embeddings=64, **ids))


@pytest.fixture
def other_arch_dir(tmp_path, tiny_tokenizer):
    def make(family="gpt2"):
        folder = tmp_path / family
        _tiny_hf(family).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return folder

    return make


def _load(folder, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = FastLanguageModel.from_pretrained(str(folder), **kw)
    return model, tok, [w for w in caught if issubclass(w.category, FallbackWarning)]


def _train(model, tok, out, steps=4, **cfg):
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=cfg.pop("learning_rate", 1e-2), max_steps=steps, **cfg)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    trainer.train()
    return trainer, [h["loss"] for h in trainer.log_history if "loss" in h]


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_architecture_trains_with_one_warning_and_adapter_loads_in_peft(family, other_arch_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = other_arch_dir(family)
    model, tok, warned = _load(folder)
    assert isinstance(model, FallbackModel) and len(warned) == 1
    assert f"'{family}'" in str(warned[0].message) and "standard speed" in str(warned[0].message)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    _, losses = _train(model, tok, tmp_path / "out")
    assert len(losses) == 4 and losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter", tok)

    ids = torch.randint(3, 259, (2, 9))
    with torch.no_grad():
        ours = model.eval()(ids).logits
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(tmp_path / "adapter"))
        torch.testing.assert_close(ref.eval()(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
        again, _, warned = _load(tmp_path / "adapter")
        assert len(warned) == 1 and again.lora_settings == model.lora_settings
        torch.testing.assert_close(again.eval()(ids).logits, ours, rtol=1e-5, atol=1e-5)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(again) == trainable(model)


def test_no_fast_llama_gives_the_fast_paths_losses(tiny_model_dir, tmp_path):
    """Same seed -> same initial adapter on both paths; then the same batches must give the same losses, and TRL's
    SFT token metrics (entropy, mean_token_accuracy) in training and in evaluate()."""
    folder = tiny_model_dir("llama")
    runs, logged = {}, {}
    for fast in (True, False):
        model, tok, warned = _load(folder, fast=fast)
        assert isinstance(model, FallbackModel) == (not fast) and len(warned) == (0 if fast else 1)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0,
                                                 modules_to_save=["lm_head"], use_gradient_checkpointing=False)
        trainer, losses = _train(model, tok, tmp_path / f"o{fast}", steps=6)
        runs[fast] = (model, losses)
        logged[fast] = ([(h["entropy"], h["mean_token_accuracy"]) for h in trainer.log_history if "loss" in h],
                        trainer.evaluate(_rows()[:5]))
        model.save_pretrained(tmp_path / f"a{fast}")
    torch.testing.assert_close(torch.tensor(runs[False][1]), torch.tensor(runs[True][1]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(logged[False][0]), torch.tensor(logged[True][0]), rtol=1e-5, atol=1e-6)
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert logged[False][1][key] == pytest.approx(logged[True][1][key], rel=1e-5), key
    # The fallback's (PEFT-written) adapter loads on the fast path and gives the same logits.
    fast_again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "aFalse"))
    ids = torch.randint(3, 259, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fast_again(ids).logits, runs[False][0].eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_merged_checkpoint_and_modules_to_save(other_arch_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = _load(other_arch_dir("gpt2"))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=["embed_tokens", "lm_head"])
    assert model.lora_settings.modules_to_save == ["embed_tokens", "lm_head"]
    assert len(model.embedding_param_names) == 2 and not model.arch.tie_embeddings  # wte + lm_head copies
    _train(model, tok, tmp_path / "out", steps=2, embedding_learning_rate=1e-3)
    model.save_pretrained_merged(tmp_path / "merged", tok)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 259, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.lora_settings is not None  # saving merged leaves the live model as it was
    for method in ("merged_4bit", "merged_4bit_forced", "merged_fp8"):  # (it wrote 16-bit weights for them)
        with pytest.raises(ConfigError, match="not implemented for models on the transformers fallback"):
            model.save_pretrained_merged(tmp_path / "q", tok, save_method=method)
    assert not (tmp_path / "q").exists()


def test_full_finetuning_and_resume(other_arch_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = other_arch_dir("gpt2")
    model, tok, _ = _load(folder, full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    trainer, losses = _train(model, tok, tmp_path / "full", steps=4, save_steps=2, learning_rate=1e-3)
    resumed_model, _, _ = _load(folder, full_finetuning=True)
    args = SFTConfig(output_dir=str(tmp_path / "full"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-3, max_steps=4, save_steps=2)
    resumed = SFTTrainer(model=resumed_model, tokenizer=tok, train_dataset=_rows(), args=args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert [h["loss"] for h in resumed.log_history] == losses
    model.save_pretrained(tmp_path / "model", tok)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(3, 259, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_architecture_transformers_cannot_train_is_a_clear_error(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelLoadError, match="'t5' is not supported.*AutoModelForCausalLM"):
        FastLanguageModel.from_pretrained(str(tmp_path / "t5"))


def test_generation_uses_transformers_generate(other_arch_dir):
    from transformers import AutoModelForCausalLM

    from fasttune.errors import ConfigError
    from fasttune.generate import generate

    folder = other_arch_dir("gpt2")
    model, _, _ = _load(folder)
    prompt = torch.tensor([[5, 6, 7]])
    ref = AutoModelForCausalLM.from_pretrained(folder).eval().generate(prompt, max_new_tokens=4, do_sample=False,
                                                                       pad_token_id=256)
    assert torch.equal(model.generate(prompt, max_new_tokens=4), ref)
    with pytest.raises(ConfigError, match="use model.generate"):  # fasttune's KV cache is our decoder's
        generate(model, prompt, max_new_tokens=2)


def test_generation_arguments_pass_through_and_are_checked_as_on_our_decoder(other_arch_dir):
    """transformers' generation arguments reach transformers' generate; the ones fasttune's generate refuses (and
    misspelt ones) are the same ConfigError here, before transformers runs."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from fasttune.errors import ConfigError

    folder = other_arch_dir("gpt2")
    model, _, _ = _load(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = dict(max_new_tokens=6, repetition_penalty=1.4, min_new_tokens=2, temperature=1.5, min_p=0.1)
    assert torch.equal(model.generate(prompt, **kw), hf.generate(prompt, pad_token_id=256, **kw))
    assert model.generate(prompt).shape == (2, 4 + 32)  # fasttune's default length on both model kinds
    assert model.generate(prompt, generation_config=GenerationConfig(max_length=7)).shape == (2, 7)
    out = model.generate(inputs=prompt, do_sample=True, num_return_sequences=3, max_new_tokens=3, seed=0)
    assert out.shape == (6, 7) and torch.equal(out[:, :4], prompt.repeat_interleave(3, dim=0))
    for bad, match in [(dict(num_beams=2), "beam search"), (dict(temprature=1.5), "Did you mean 'temperature'"),
                       (dict(num_return_sequences=2), "needs do_sample=True")]:
        with pytest.raises(ConfigError, match=match):
            model.generate(prompt, **bad)


def test_dft_loss_on_the_fallback_equals_the_fast_path(tiny_model_dir, tmp_path):
    """SFTConfig(loss_type="dft") on the transformers fallback: the same per-step losses as our decoder's."""
    runs = {}
    for fast in (True, False):
        model, tok, _ = _load(tiny_model_dir("llama"), fast=fast)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        runs[fast] = _train(model, tok, tmp_path / f"d{fast}", steps=2, loss_type="dft")[1]
    torch.testing.assert_close(torch.tensor(runs[False]), torch.tensor(runs[True]), rtol=1e-5, atol=0)


def test_a_vision_checkpoint_loaded_text_only_says_so(tmp_path, tiny_tokenizer):
    """Llama 4 (not a family of ours): AutoModelForCausalLM loads Llama4ForCausalLM, its language model only. The
    fallback's load says that the vision tower is not loaded and a merged save holds the language model alone (it
    said nothing of the tower before); a text checkpoint gets no such warning (test above: one warning)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300, num_local_experts=2,
                num_experts_per_tok=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layers=[1, 1])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision, image_token_index=299)) \
        .save_pretrained(tmp_path / "l4")
    tiny_tokenizer.save_pretrained(tmp_path / "l4")
    model, _, warned = _load(tmp_path / "l4", device="cpu")
    assert isinstance(model, FallbackModel) and type(model.transformers_model).__name__ == "Llama4ForCausalLM"
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2 and "the towers are not loaded" in messages[1] and "vision tower(s)" in messages[1]
