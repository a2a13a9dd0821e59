"""FastLanguageModel.add_new_tokens: tokenizer + embeddings grow together, new rows start at the mean of the old
ones (tied and untied), and adapters of a grown model load back onto the original base."""
import pytest
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
from fasttune.errors import ConfigError

NEW = ["<|think|>", "<|tool|>"]


def _rows(n=8):
    return [{"text": f"<|think|> step {i} <|tool|> call {i % 3}"} for i in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied, tied
def test_new_rows_are_the_mean_and_old_rows_unchanged(family, tiny_model_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir(family, vocab_size=259)))  # = len(tok)
    emb_before = model.model.embed_tokens.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    ids = FastLanguageModel.add_new_tokens(model, tok, NEW)
    assert ids == [259, 260] and tok.convert_tokens_to_ids(NEW) == ids
    assert tok("a <|think|>")["input_ids"][-1] == 259  # one token, as a special token
    assert model.arch.vocab_size == 261 == model.hf_config.vocab_size
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb.shape == head.shape == (261, 64)
    assert (head is emb) == (family == "qwen2")
    torch.testing.assert_close(emb[:259], emb_before)
    torch.testing.assert_close(head[:259], head_before)
    for i in ids:
        torch.testing.assert_close(emb[i], emb_before.mean(0))
        torch.testing.assert_close(head[i], head_before.mean(0))
    assert FastLanguageModel.add_new_tokens(model, tok, NEW) == []  # already there: nothing changes


def test_ids_inside_a_padded_vocabulary_are_reinitialised(tiny_model_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))  # vocab 300 > 259 tokens
    before = model.model.embed_tokens.weight.detach().clone()
    ids = FastLanguageModel.add_new_tokens(model, tok, NEW)
    assert model.arch.vocab_size == 300 and ids == [259, 260]
    keep = [i for i in range(300) if i not in ids]
    torch.testing.assert_close(model.model.embed_tokens.weight[259], before[keep].mean(0))


def test_after_get_peft_model_is_an_error(tiny_model_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(ConfigError, match="before FastLanguageModel.get_peft_model"):
        FastLanguageModel.add_new_tokens(model, tok, NEW)


@pytest.mark.parametrize("family, modules", [("llama", ["embed_tokens", "lm_head"]), ("qwen2", ["embed_tokens"]),
                                             ("llama", [])])
def test_adapter_of_a_grown_model_loads_back(family, modules, tiny_model_dir, tmp_path):
    """The base keeps its old vocabulary; the tokenizer saved with the adapter says which tokens to add on load."""
    folder = tiny_model_dir(family, vocab_size=259)
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    FastLanguageModel.add_new_tokens(model, tok, NEW)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=modules)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1)
    SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args).train()
    model.save_pretrained(tmp_path / "adapter", tok)

    again, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"))
    assert len(tok2) == 261 and again.arch.vocab_size == 261
    ids = torch.tensor([tok("x <|think|> y <|tool|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    if modules:  # PEFT on transformers' model, grown first, gives the same logits
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder)
        hf.resize_token_embeddings(261)
        ref = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(ref(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_fallback_model_grows_and_loads_back(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=259)).save_pretrained(tmp_path / "g")
    tiny_tokenizer.save_pretrained(tmp_path / "g")
    with pytest.warns(UserWarning):
        model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "g"))
    before = model.base_model.get_input_embeddings().weight.detach().clone()
    FastLanguageModel.add_new_tokens(model, tok, NEW)
    grown = model.base_model.get_input_embeddings().weight
    assert model.arch.vocab_size == 261 and grown.shape == (261, 32)
    torch.testing.assert_close(grown[260], before.mean(0))
    model = FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["embed_tokens", "lm_head"])
    model.save_pretrained(tmp_path / "adapter", tok)
    with pytest.warns(UserWarning):
        again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([tok("x <|think|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_tokens_added_to_the_tokenizer_only_are_a_clear_error_until_resized(tiny_model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama", vocab_size=259)))  # = len(tok)
    tok.add_tokens(NEW, special_tokens=True)  # the model is not told (a common slip)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=2)
    with pytest.raises(ConfigError, match=r"token id 26\d.*259 rows.*resize_token_embeddings\(len\(tokenizer\)\)"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(2), args=args)
    before = model.model.embed_tokens.weight.detach().clone()
    assert model.resize_token_embeddings(len(tok), pad_to_multiple_of=8) is model.model.embed_tokens
    assert model.arch.vocab_size == model.config.vocab_size == 264 and model.lm_head.weight.shape[0] == 264
    torch.testing.assert_close(model.model.embed_tokens.weight[:259], before)
    torch.testing.assert_close(model.model.embed_tokens.weight[261], before.mean(0))
    model = FastLanguageModel.get_peft_model(model, r=4, modules_to_save=["embed_tokens", "lm_head"])
    SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(2), args=args).train()
    with pytest.raises(ConfigError, match="before FastLanguageModel.get_peft_model"):
        model.resize_token_embeddings(100)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied heads
def test_shrinking_keeps_the_first_rows_as_transformers(tiny_model_dir, family):
    """len(tokenizer) below a vocabulary padded for speed (Qwen's 151,936 rows for 151,665 tokens): transformers'
    resize_token_embeddings keeps the first rows, and so do we; logits equal transformers' shrunk model's."""
    import transformers

    folder = tiny_model_dir(family)  # 300 rows, a 259-token tokenizer
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok.add_tokens(NEW)
    assert model.resize_token_embeddings(len(tok)) is model.get_input_embeddings()
    theirs.resize_token_embeddings(len(tok))
    assert model.arch.vocab_size == model.config.vocab_size == len(tok) == model.lm_head.weight.shape[0]
    ids = torch.tensor([tok("alpha <|think|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)
