"""Cohere (Command R, Aya) and Cohere 2 (Command R7B, Command A): attention and MLP side by side on one LayerNorm's
output, RoPE on adjacent pairs (Cohere 2: in the sliding layers only), logits times logit_scale. The shared family
tests (tests/tiny.py's FAMILIES: logits, LoRA against PEFT, generation, GGUF in llama.cpp) run both (Cohere 2's
3-sliding-1-full layout); here Command R+'s per-head q/k LayerNorms, the recompute modes (the parallel block keeps
no attention block under "offload") and the GGUF layouts llama.cpp cannot read."""
import pytest
import torch
from peft_oracle import assert_grads_close, peft_grads, peft_twin, randomize_lora_b
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel
from fasttune.errors import ConfigError

pytest.importorskip("transformers.models.cohere2")


def test_recompute_and_offload_give_the_gradients_of_no_recompute(tmp_path):
    folder = save_hf(hf_model("cohere2"), tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    assert not any(layer.self_attn.keeps_block for layer in model.model.layers)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in (False, True, "offload"):
        model.gradient_checkpointing = mode
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for mode in (True, "offload"):
        assert grads[mode].keys() == grads[False].keys()
        for n, g in grads[False].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {n}")


def test_gguf_refuses_layouts_llama_cpp_does_not_read(tmp_path):
    """llama.cpp's cohere2 slides every layer but each 4th; another layout is refused before anything is written."""
    types = ["sliding_attention", "full_attention"] * 2
    folder = save_hf(hf_model("cohere2", layer_types=types), tmp_path / "m")
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="the only layout llama.cpp's cohere2 reads"):
        model.save_pretrained_gguf(str(tmp_path / "m.gguf"), tok)
    assert not (tmp_path / "m.gguf").exists()


def test_command_r_plus_qk_norms_equal_transformers_and_peft(tmp_path):
    """use_qk_norm=True: LayerNorms over each head's q / k with a weight per head ((heads, head_dim), drawn around
    1): logits equal transformers', LoRA gradients PEFT's; GGUF refuses them below 64 layers (llama.cpp's rule)."""
    from bpe_tokenizers import make_bpe_tokenizer

    tok = make_bpe_tokenizer("gpt2")
    hf = hf_model("cohere", vocab_size=416, use_qk_norm=True)  # (its norms drawn around 1 by tests/tiny.py)
    assert hf.model.layers[0].self_attn.q_norm.weight.shape == (4, 16)
    folder = save_hf(hf, tmp_path / "m", tok)
    ours, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    twin = peft_twin("cohere", tmp_path / "adapter", vocab_size=416, use_qk_norm=True)
    model(ids, labels=ids).loss.backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, peft_grads(twin))
    with pytest.raises(ConfigError, match="reads q/k norms exactly when a model has 64 layers or more"):
        model.save_pretrained_gguf(str(tmp_path / "m.gguf"), tok)
    assert not (tmp_path / "m.gguf").exists()


def test_command_r_plus_layout_in_llama_cpp(tmp_path):
    """llama.cpp's command-r reads q/k norms from 64 layers on (Command R+'s 64): a 64-layer tiny model with them
    gives llama.cpp's logits (f16)."""
    from bpe_tokenizers import make_bpe_tokenizer

    llama_cpp = pytest.importorskip("llama_cpp")
    tok = make_bpe_tokenizer("gpt2")
    folder = save_hf(hf_model("cohere", vocab_size=416, use_qk_norm=True, num_hidden_layers=64), tmp_path / "m", tok)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    model.save_pretrained_gguf(str(tmp_path / "m.gguf"), tok, quantization_method="f16")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    row = torch.randint(3, 400, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    llm.eval(row)
    got = torch.tensor(llm.scores[:len(row)])
    with torch.no_grad():
        want = model(torch.tensor([row])).logits[0].float()
    assert (got - want).abs().max() < 0.05
