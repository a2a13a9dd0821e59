"""GMPO against TRL 1.16's experimental GMPOTrainer (TRL's sampler replaced by the fixed completions, our model's
PEFT twin with the same adapter): loss, LoRA gradients and the entropy / kl / clip metrics of one micro-batch whose
old log-probs are moved so that the log-space clipping acts, with and without a reference (beta) and the entropy
mask; the config's default range; a short training run and the CLI."""
import warnings

import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS, G, assert_step_equals_trl, count_a
from peft_oracle import peft_twin, saved_lora_adapter
from preference_oracle import shift_policy

from fasttune import FastLanguageModel, GMPOConfig, GMPOTrainer

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("gmpo")
    return root, saved_lora_adapter(root, tiny_tokenizer)[1]


def _trl(adapter, tok, tmp_path, **cfg):
    from datasets import Dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gmpo import GMPOConfig as TRLConfig, GMPOTrainer as TRLTrainer

    class Fixed(TRLTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            return [list(c) for c in COMPLETIONS[:len(prompt_ids)]], None

    args = TRLConfig(output_dir=str(tmp_path / "trl"), num_generations=G, max_completion_length=6, use_cpu=True,
                     report_to="none", bf16=False, per_device_train_batch_size=len(COMPLETIONS), **cfg)
    tr = Fixed(model=peft_twin("llama", adapter), reward_funcs=[count_a], args=args,
               train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    tr.current_gradient_accumulation_steps = 1
    return tr


def _ours(root, tok, tmp_path, **cfg):
    model, _ = FastLanguageModel.from_pretrained(str(root / "adapter"), dtype="float32")
    cfg = {"per_device_train_batch_size": len(COMPLETIONS), "num_generations": G, "max_completion_length": 6,
           "max_steps": 1, "shuffle": False, **cfg}
    return GMPOTrainer(model, reward_funcs=[count_a], args=GMPOConfig(output_dir=str(tmp_path / "ours"), **cfg),
                       train_dataset=ROWS, processing_class=tok)


@pytest.mark.parametrize("cfg", [dict(beta=0.0), dict(beta=0.1), dict(beta=0.0, top_entropy_quantile=0.5),
                                 dict(beta=0.0, epsilon=0.2, epsilon_high=0.3)], ids=["plain", "kl", "entropy", "eps"])
def test_loss_grads_and_metrics_equal_trl(model_and_adapter, tmp_path, cfg):
    root, tok = model_and_adapter
    ours = _ours(root, tok, tmp_path, temperature=0.8, **cfg)
    tr = _trl(root / "adapter", tok, tmp_path, temperature=0.8, **cfg)
    if cfg["beta"]:  # both took the adapter as handed over as the reference; move the policy away from it
        shift_policy(ours.model, tr.model)
    inputs = tr._generate_and_score_completions([row for row in ROWS for _ in range(G)])
    examples = ours.train_examples[:len(COMPLETIONS)]
    batch = ours.score(examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]
    torch.testing.assert_close(batch["advantages"], inputs["advantages"], rtol=1e-5, atol=1e-6)
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():
        now = ours.completion_logps(batch["input_ids"], batch["attention_mask"], mask.shape[1])
    old = now + 0.6 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    batch["old_logps"] = inputs["old_per_token_logps"] = old * mask
    metrics = ["entropy", *(["kl"] if cfg["beta"] else [])]
    assert_step_equals_trl(ours.model, ours, batch, int(mask.sum()), tr, inputs, metrics)


def test_config_default_and_a_short_run(model_and_adapter, tmp_path):
    root, tok = model_and_adapter
    assert GMPOConfig(output_dir="o").epsilon == 0.4
    trainer = _ours(root, tok, tmp_path, max_steps=2, per_device_train_batch_size=4, max_completion_length=4)
    trainer.train()
    logged = [h for h in trainer.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2] and "clip_ratio/region_mean" in logged[0]


def test_cli_method_gmpo(model_and_adapter, tmp_path, capsys):
    import json

    from fasttune.cli import main

    root, _ = model_and_adapter
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) for r in ROWS * 2))
    out = tmp_path / "out"
    assert main(["train", "--method", "gmpo", "--model", str(root / "llama"), "--data", str(data), "--output-dir",
                 str(out), "--reward-funcs", "exact_match", "--max-steps", "1", "--batch-size", "4",
                 "--num-generations", "4", "--max-completion-length", "4", "--lora-r", "4", "--no-sample"]) == 0, \
        capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").exists()
