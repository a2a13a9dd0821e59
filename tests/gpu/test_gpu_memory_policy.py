"""use_gradient_checkpointing="auto" on a real GPU whose free memory sits between the two modes: the trainer picks a
partial recompute, and the step's measured peak stays inside the budget the estimate allowed (skipped without
CUDA). Run it alone: the ballast tensor takes most of the card, and the estimate reads the device's free memory."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_auto_picks_partial_recompute_and_fits(tmp_path, capsys):
    from tiny_tokenizer import make_tiny_tokenizer
    from transformers import LlamaConfig

    from fasttune import FastLanguageModel, SFTConfig, SFTTrainer
    from fasttune.models.causal_lm import CausalLM
    from fasttune.train.memory_policy import RESERVE_BYTES

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = CausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing="auto")
    # 4 rows x ~4,000 tokens: ~0.57 GiB of saved activations a layer without recompute (~9 GiB for 16 layers);
    # leave 2 GiB of reserve plus ~5 GiB, so neither "off" nor every layer's recompute is the pick
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(free - RESERVE_BYTES - 5 * 2**30, dtype=torch.uint8, device="cuda")
    free, _ = torch.cuda.mem_get_info()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rows = [{"text": ("abcdefgh " * 450)[:4000]} for _ in range(8)]
    trainer = SFTTrainer(model, tok, train_dataset=rows,
                         args=SFTConfig(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=4,
                                        max_seq_length=4096, bf16=True, report_to="none", save_strategy="no"))
    trainer.train()
    err = capsys.readouterr().err
    mode = model.gradient_checkpointing  # (the recomputed layers' inputs on the GPU, or in host memory)
    assert mode in (True, "offload") and 0 < model.recompute_layers < 16, err
    assert f"{'on' if mode is True else 'offload'} for the first {model.recompute_layers} of 16 layers" in err
    assert ("with lean saves" in err) == model.lean_saves  # (taken when they spare recomputed layers)
    assert torch.cuda.max_memory_allocated() - start <= free - RESERVE_BYTES
    del ballast
