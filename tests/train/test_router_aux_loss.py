"""SFTConfig.router_aux_loss_coef as TRL 1.16 reads it: on a mixture-of-experts model the load-balancing loss is on
by default (the config's coefficient), equal to trl.SFTTrainer's; 0 turns it off; refused on dense models."""
import pytest
import torch

from fasttune import SFTConfig
from fasttune.errors import ConfigError
from sft_twins import lora_model, our_sft, trl_sft

pytest.importorskip("trl")


@pytest.mark.parametrize("coef", [None, 0.1, 0.0])
def test_moe_losses_equal_trl_sft_trainer(tiny_model_dir, tmp_path, coef):
    folder = tiny_model_dir("qwen3_moe")
    ours, our_eval, trainer = our_sft(folder, tmp_path / "ours", bs=3, ga=2, steps=2, router_aux_loss_coef=coef)
    theirs, their_eval, _ = trl_sft(folder, tmp_path / "trl", bs=3, ga=2, steps=2, router_aux_loss_coef=coef)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    assert trainer.model.config.output_router_logits is (coef != 0.0)
    if coef == 0.1:  # the weight acts: the same run without the auxiliary loss is lower
        plain = our_sft(folder, tmp_path / "plain", bs=3, ga=2, steps=2, router_aux_loss_coef=0.0)[0]
        assert ours[0] > plain[0] + 1e-3


def test_dense_models_refuse_a_coefficient(tiny_model_dir, tmp_path):
    from fasttune import SFTTrainer

    model, tok = lora_model(tiny_model_dir("llama"))
    rows = [{"text": "alpha beta"}] * 2
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.01: this llama model is not a mixture of experts"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=rows,
                   args=SFTConfig(output_dir=str(tmp_path), router_aux_loss_coef=0.01))
    SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=SFTConfig(output_dir=str(tmp_path)))
    assert not getattr(model.config, "output_router_logits", False)
