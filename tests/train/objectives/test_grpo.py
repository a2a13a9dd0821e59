"""GRPO: TRL's GRPOTrainer (on a PEFT twin carrying our adapter) is the oracle for the advantages, the reference
log-probs and the per-step loss and gradients; plus gradient-accumulation equivalence and data/config errors."""
import asyncio

import pytest
import torch
from grpo_oracle import COMPLETIONS, ROWS, G, assert_step_equals_trl, count_a, fixed_completions_trl
from peft_oracle import peft_twin, randomize_lora_b
from preference_oracle import shift_policy
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel, GRPOConfig, GRPOTrainer
from fasttune.errors import ConfigError, DataError
from fasttune.train.objectives.grpo_loss import off_policy_mask
from fasttune.train.rewards import ExactMatch, RegexMatch

trl = pytest.importorskip("trl")

FixedCompletionsTRL = fixed_completions_trl()


def sometimes_none(prompts, completions, **_):
    return [None if i % 3 == 0 else float(len(c)) for i, c in enumerate(completions)]


REWARDS = [ExactMatch(), count_a, RegexMatch(r"^b+$")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("grpo") / "llama"
    save_hf(hf_model("llama", seed=0), folder, tiny_tokenizer)
    return folder


@pytest.fixture(scope="module")
def ours_and_adapter(tiny_dir, tmp_path_factory):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora_b(model)  # non-zero B: the adapter changes the logits and the reference differs from the policy
    adapter = tmp_path_factory.mktemp("grpo_adapter") / "adapter"
    model.save_pretrained(str(adapter))
    return model, tok, adapter


def _ours(model, tok, tmp_path, **cfg):
    cfg = {"per_device_train_batch_size": len(COMPLETIONS), "gradient_accumulation_steps": 1,
           "num_generations": G, "max_completion_length": 6, "max_steps": 1, "max_grad_norm": 0.0, **cfg}
    return GRPOTrainer(model, reward_funcs=cfg.pop("reward_funcs", REWARDS), args=GRPOConfig(
        output_dir=str(tmp_path / "ours"), shuffle=False, **cfg), train_dataset=ROWS, processing_class=tok)


def _trl_trainer(adapter, tok, tmp_path, rewards=REWARDS, family="llama", **cfg):
    """TRL's trainer on the transformers twin of our model, handed our saved adapter as a PeftModel (as our trainer
    is handed our model): with beta > 0 TRL copies that adapter as its frozen "ref" adapter, the reference, as
    fasttune's ReferencePolicy keeps the adapter as handed over."""
    from datasets import Dataset

    cfg = {"per_device_train_batch_size": len(COMPLETIONS), "gradient_accumulation_steps": 1, **cfg}
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), num_generations=G, max_completion_length=6, use_cpu=True,
                          report_to="none", bf16=False, **cfg)
    tr = FixedCompletionsTRL(model=peft_twin(family, adapter), reward_funcs=list(rewards), args=args,
                             train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    assert ("ref" in tr.model.peft_config) == bool(args.beta)
    tr.current_gradient_accumulation_steps = 1  # set by transformers' training loop; we call the loss directly
    return tr


def _trl_rollout(tr):
    """TRL's scored batch of the fixed completions (prompt i // G for completion i)."""
    return tr._generate_and_score_completions([row for row in ROWS for _ in range(G)])


def _trl(adapter, tok, tmp_path, rewards=REWARDS, **cfg):
    tr = _trl_trainer(adapter, tok, tmp_path, rewards, **cfg)
    return tr, _trl_rollout(tr)


def _our_batch(trainer):
    examples = [trainer.train_examples[i] for i in range(len(COMPLETIONS))]
    return trainer.score(examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)])[0]


@pytest.mark.parametrize("scale_rewards,aggregation", [("group", "sum_then_normalize"), ("batch", "sum_then_normalize"),
                                                       ("none", "sum_then_normalize"), ("group", "normalize_then_sum")])
def test_advantages_match_trl(ours_and_adapter, tmp_path, scale_rewards, aggregation):
    """Advantages and reward metrics, also with GDPO's per-function normalisation (normalize_then_sum)."""
    model, tok, adapter = ours_and_adapter
    rewards = [*REWARDS, sometimes_none]
    cfg = dict(scale_rewards=scale_rewards, reward_weights=[1, .5, 2, .1], multi_objective_aggregation=aggregation)
    ours = _ours(model, tok, tmp_path, reward_funcs=rewards, **cfg)
    tr, want = _trl(adapter, tok, tmp_path, rewards, **cfg)
    got = _our_batch(ours)
    assert got["advantages"].abs().sum() > 0
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-6, atol=1e-6)
    # the same prompt tokens (left-padded) and completion masks as TRL builds them
    width = want["prompt_ids"].shape[1]
    torch.testing.assert_close(got["input_ids"][:, :width], want["prompt_ids"])
    torch.testing.assert_close(got["completion_mask"], want["completion_mask"])
    mine = ours._metrics
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/count_a/mean", "rewards/exact_match/std"):
        assert mine[name][-1] == pytest.approx(tr._metrics["train"][name][-1], rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("beta,bias_correction", [(0.0, True), (0.1, True), (0.1, False)])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_loss_and_grads_match_trl(ours_and_adapter, tmp_path, loss_type, beta, bias_correction):
    model, tok, adapter = ours_and_adapter
    cfg = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, temperature=0.8,
               use_bias_correction_kl=bias_correction)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        _loss_and_grads_match_trl(model, tok, adapter, tmp_path, cfg)
    finally:  # the model is shared by the module's tests
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("grpo", 0.1), ("dapo", 0.0)])
def test_gspo_loss_and_grads_match_trl(ours_and_adapter, tmp_path, loss_type, beta):
    """importance_sampling_level="sequence" (GSPO): one ratio per completion; loss, LoRA gradients and the clip
    metrics (counted per completion) equal TRL's."""
    model, tok, adapter = ours_and_adapter
    cfg = dict(loss_type=loss_type, beta=beta, epsilon=0.02, epsilon_high=0.03, temperature=0.8,
               importance_sampling_level="sequence")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        _loss_and_grads_match_trl(model, tok, adapter, tmp_path, cfg)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])


# TRL 1.16's other losses: CISPO (clipped REINFORCE weights), SAPO (soft gates, no clipping to report), LUSPO (with
# GSPO's sequence ratio, as its paper), and INTELLECT-2's two-sided clipping (delta) on dapo
@pytest.mark.parametrize("cfg,checks", [
    (dict(loss_type="cispo", epsilon_high=1.1), dict(clipped="cispo_clip_ratio", clip_metrics=["cispo_clip_ratio"])),
    (dict(loss_type="sapo", sapo_temperature_pos=1.2), dict(clipped=None, clip_metrics=[])),
    (dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.02, epsilon_high=0.03), {}),
    (dict(loss_type="dapo", delta=1.3, epsilon=0.2, epsilon_high=0.28), {}),
    (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
     dict(clipped=None, clip_metrics=["vespo/phi_seq_mean"])),
    # the policy term on the top 40% of tokens by entropy, and an entropy bonus (its gradient goes through the
    # entropy of every completion token's distribution); policy_loss is logged beside the loss
    (dict(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.05), dict(metrics=["policy_loss"])),
    (dict(loss_type="grpo", top_entropy_quantile=0.0), {}),
    (dict(loss_type="bnpo", entropy_coef=0.1), dict(metrics=["policy_loss"])),
    # DeepSeek-V3.2's off-policy sequence mask (checked to drop some completions), with the entropy mask too
    (dict(loss_type="dapo", off_policy_mask_threshold=0.05), {}),
    (dict(loss_type="grpo", off_policy_mask_threshold=0.0, top_entropy_quantile=0.5), {})],
    ids=["cispo", "sapo", "luspo", "delta", "vespo", "top_entropy_bonus", "top_entropy_0", "entropy_bonus",
         "off_policy_mask", "off_policy_and_entropy_masks"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_other_losses_match_trl(ours_and_adapter, tmp_path, cfg, checks, beta):
    model, tok, adapter = ours_and_adapter
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        _loss_and_grads_match_trl(model, tok, adapter, tmp_path, dict(cfg, beta=beta, temperature=0.8), **checks)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])


def test_qwen3_5_loss_and_grads_match_trl(tmp_path, tiny_tokenizer):
    """Qwen3.5 (gated DeltaNet layers; left-padded prompts and the completions' padding through the delta rule) against
    TRL on transformers + PEFT, with a reference (beta > 0)."""
    save_hf(hf_model("qwen3_5_text", seed=0), tmp_path / "m", tiny_tokenizer)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "m"), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora_b(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    _loss_and_grads_match_trl(model, tok, tmp_path / "adapter", tmp_path, dict(loss_type="grpo", beta=0.1),
                              family="qwen3_5_text")


def _loss_and_grads_match_trl(model, tok, adapter, tmp_path, cfg, family="llama", metrics=(), **checks):
    beta = cfg["beta"]
    ours = _ours(model, tok, tmp_path, **cfg)
    tr = _trl_trainer(adapter, tok, tmp_path, family=family, **cfg)
    if beta:  # both took the adapter as handed over as the reference; now move the policy away from it
        shift_policy(model, tr.model)
    inputs = _trl_rollout(tr)
    batch = _our_batch(ours)
    mask = inputs["completion_mask"].bool()
    if beta:  # reference = the starting adapter, computed at sampling time on both sides
        torch.testing.assert_close(batch["ref_logps"][mask], inputs["ref_per_token_logps"][mask], rtol=1e-5,
                                   atol=1e-5)
        assert not torch.allclose(batch["ref_logps"][mask], _policy_logps(ours, batch)[mask], atol=1e-3)
    # Old log-probs away from the current ones, so the ratios leave [1 - eps, 1 + eps] and clipping acts.
    old = _policy_logps(ours, batch) + 0.4 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    batch["old_logps"] = inputs["old_per_token_logps"] = old * mask
    num_items = int(mask.sum())
    if cfg.get("off_policy_mask_threshold") is not None:  # the mask drops some completions and keeps others
        kept = off_policy_mask(batch["advantages"], _policy_logps(ours, batch), batch["old_logps"], mask,
                               cfg["off_policy_mask_threshold"])
        assert 0 < kept.sum() < len(kept), kept

    # the completion tokens' mean entropy is logged in every case, as TRL logs it
    assert_step_equals_trl(model, ours, batch, num_items, tr, inputs, ["entropy", *metrics, *(["kl"] if beta else [])],
                           **checks)
    return ours


@pytest.mark.parametrize("coef", [None, 0.3])
def test_moe_load_balancing_loss_equals_trl(coef, tiny_model_dir, tmp_path):
    """On a mixture-of-experts model TRL 1.16's GRPOTrainer adds router_aux_loss_coef (default: the config's) x the
    policy forward's load-balancing loss over the rows' real tokens (left-padded prompts, padded completions):
    loss, LoRA gradients and the aux_loss metric equal TRL's; training divides it by the step's micro-batches,
    evaluation takes it whole; 0.0 turns it off; a weight on a dense model is refused."""
    from preference_oracle import attention_lora_pair

    # LoRA on attention: the load-balancing loss reaches it through the routers' inputs
    model, tok, _ = attention_lora_pair(tiny_model_dir("qwen3_moe"), tmp_path, "qwen3_moe")
    cfg = dict(loss_type="grpo", beta=0.0, **({} if coef is None else {"router_aux_loss_coef": coef}))
    ours = _loss_and_grads_match_trl(model, tok, tmp_path / "init", tmp_path, cfg, family="qwen3_moe",
                                     metrics=["aux_loss"])
    weight = model.config.router_aux_loss_coef if coef is None else coef
    assert ours.aux_weight == weight > 0 and not model.config.output_router_logits  # (the config is left as it is)
    ours.step_micro_batches = 4  # (set by the loop: the step's micro-batches over all ranks)
    assert float(ours.with_aux_loss(torch.tensor(0.0), torch.tensor(2.0))) == pytest.approx(weight * 0.5)
    model.eval()
    assert float(ours.with_aux_loss(torch.tensor(0.0), torch.tensor(2.0))) == pytest.approx(weight * 2.0)
    model.train()
    off = _ours(model, tok, tmp_path, loss_type="grpo", router_aux_loss_coef=0.0)
    off.micro_batch_loss(_our_batch(off), 10)
    assert off.aux_weight == 0.0 and "aux_loss" not in off._ratios


def test_moe_load_balancing_loss_on_the_fallback(tiny_model_dir, tmp_path):
    """The transformers fallback adds the same load-balancing loss (transformers' own, asked for in the policy's
    forward only) as our decoder; a weight on a dense model is refused, naming the setting."""
    folder = tiny_model_dir("qwen3_moe")
    out = []
    for fast in (True, False):
        model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32", fast=fast)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        tr = _ours(model, tok, tmp_path, loss_type="grpo", router_aux_loss_coef=0.5)
        batch = _our_batch(tr)
        loss, _ = tr.micro_batch_loss(batch, int(batch["completion_mask"].sum()))
        s, n = tr._ratios["aux_loss"][-1]
        out.append((float(loss.detach()), float(s / n)))
    assert out[0][1] > 0 and out[0] == pytest.approx(out[1], rel=1e-5)
    dense, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype="float32")
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.5: this llama model is not a mixture of experts"):
        _ours(FastLanguageModel.get_peft_model(dense, r=4), tok, tmp_path, router_aux_loss_coef=0.5)


def _policy_logps(trainer, batch):
    with torch.no_grad():
        return trainer.completion_logps(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].shape[1])


class FixedCompletions(GRPOTrainer):
    """Our trainer with its sampler replaced by the fixed completions (for equivalence tests)."""

    def sample(self, examples, seed):
        by_prompt = {}
        out = []
        for ex in examples:
            i = by_prompt.setdefault(ex["prompt"], 0)
            by_prompt[ex["prompt"]] += 1
            out.append(COMPLETIONS[(0 if ex["prompt"] == ROWS[0]["prompt"] else G) + i])
        return out, [256 not in c for c in out]


def test_reference_is_the_loaded_adapter_as_in_trl(ours_and_adapter, tmp_path):
    """GRPO with beta > 0 started from a saved adapter that is not the identity (random LoRA B), loaded with
    from_pretrained(adapter_folder): the KL reference is that adapter as loaded, as TRL 1.16's GRPOTrainer copies a
    given PeftModel's adapter ("ref"), not the bare base. So step 0 logs kl 0, and every step's loss and kl equal
    TRL's on the same adapter and the same (fixed) completions."""
    _, tok, adapter = ours_and_adapter
    steps = 3
    cfg = dict(beta=0.1, loss_type="dapo", temperature=0.8, learning_rate=1e-2, max_grad_norm=1.0, max_steps=steps)
    model, _ = FastLanguageModel.from_pretrained(str(adapter), dtype="float32")
    ours = FixedCompletions(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS, args=GRPOConfig(
        output_dir=str(tmp_path / "ours"), per_device_train_batch_size=len(COMPLETIONS), gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=6, shuffle=False, **cfg))
    assert ours.reference.is_copy  # a loaded adapter: a frozen copy, not the adapters switched off
    ours.train()
    got = ours.log_history
    theirs = _trl_trainer(adapter, tok, tmp_path, shuffle_dataset=False, logging_steps=1, save_strategy="no", **cfg)
    theirs.train()
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == steps
    assert want[0]["kl"] == pytest.approx(0, abs=1e-7) and want[-1]["kl"] > 1e-4  # the oracle: kl 0 at step 0
    assert [h["kl"] for h in got] == pytest.approx([h["kl"] for h in want], rel=1e-4, abs=1e-7)
    # the policy term nearly cancels at ratio 1: compare the losses absolutely too
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-4, abs=1e-6)
    assert [h["reward"] for h in got] == pytest.approx([h["reward"] for h in want], rel=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grad_accumulation_equivalence(tiny_dir, tmp_path, loss_type):
    """bs 4 x GA 1 == bs 1 x GA 4 (two groups of 2 completions per step): same step loss, grad norm and update.
    (bnpo normalises each micro-batch by its own tokens, as TRL does, so it is left out.)"""
    runs = []
    for bs, ga in ((4, 1), (1, 4)):
        model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
        randomize_lora_b(model)
        args = GRPOConfig(output_dir=str(tmp_path / f"{bs}x{ga}"), per_device_train_batch_size=bs,
                          gradient_accumulation_steps=ga, num_generations=2, max_completion_length=6, max_steps=1,
                          loss_type=loss_type, beta=0.05, learning_rate=1e-2, shuffle=False, max_grad_norm=0.0,
                          adam_epsilon=1.0)
        tr = FixedCompletions(model, reward_funcs=REWARDS, args=args, train_dataset=ROWS, processing_class=tok)
        tr.train()
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append(([(h["loss"], h["grad_norm"], h["reward"]) for h in tr.log_history], params))
    (hist_a, params_a), (hist_b, params_b) = runs
    assert hist_a[0][1] > 0
    for a, b in zip(hist_a, hist_b):  # the policy loss nearly cancels at ratio 1: compare it absolutely
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # Adam's first step with the default eps is lr * sign(g): the rounding of near-zero gradients (the KL term of a
    # reference equal to the policy) would decide it. eps 1 makes the step lr * g / (|g| + 1), so the updates
    # compare the gradients themselves.
    for n in params_a:
        torch.testing.assert_close(params_a[n], params_b[n], rtol=1e-5, atol=1e-7)


def test_trains_and_logs_trl_metrics(tiny_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    args = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      num_generations=4, max_completion_length=5, max_steps=2, beta=0.1, num_iterations=2,
                      reward_funcs=["exact_match", "regex:^a", "length"])
    tr = GRPOTrainer(model, args=args, train_dataset=ROWS, processing_class=tok)
    tr.train()
    first, second = tr.log_history
    for key in ("loss", "reward", "reward_std", "rewards/exact_match/mean", "rewards/regex:^a/mean",
                "rewards/length/mean", "completions/mean_length", "kl", "clip_ratio/region_mean",
                "frac_reward_zero_std"):
        assert key in first, key
    assert 1 <= first["completions/mean_length"] <= 5
    # num_iterations=2: step 2 reuses step 1's completions (no new rollout metrics, as in TRL), with old log-probs
    assert "reward" not in second and "kl" in second and "clip_ratio/region_mean" in second
    evaluated = tr.evaluate(ROWS)  # a set given to evaluate() alone
    assert {"eval_loss", "eval_reward", "eval_rewards/length/mean", "eval_kl"} <= set(evaluated)


def test_errors_name_the_field(tiny_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    args = dict(output_dir=str(tmp_path / "e"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                num_generations=4, max_completion_length=4)
    with pytest.raises(DataError, match=r"Row 1 .*'prompt'"):
        GRPOTrainer(model, reward_funcs=[count_a], args=GRPOConfig(**args), train_dataset=[ROWS[0], {"q": "x"}],
                    processing_class=tok)
    with pytest.raises(DataError, match=r"Row 0 .*'answer'.*exact_match"):
        GRPOTrainer(model, reward_funcs=["exact_match"], args=GRPOConfig(**args), train_dataset=[{"prompt": "x"}],
                    processing_class=tok)
    def by_level(prompts, completions, level, **_):
        return [0.0] * len(completions)

    with pytest.raises(DataError, match=r"Row 0 .*'level'.*by_level"):
        GRPOTrainer(model, reward_funcs=[by_level], args=GRPOConfig(**args), train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        GRPOTrainer(model, reward_funcs=[count_a], args=GRPOConfig(**{**args, "per_device_train_batch_size": 3}),
                    train_dataset=ROWS, processing_class=tok)
    full, _ = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32", full_finetuning=True)
    kl = GRPOTrainer(full, reward_funcs=[count_a], args=GRPOConfig(**args, beta=0.1), train_dataset=ROWS,
                     processing_class=tok)  # full fine-tuning with beta > 0: the reference is a copy of every weight
    assert set(kl.reference.saved) == {n for n, _ in full.named_parameters()}
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOConfig(**args, loss_type="ppo")
    with pytest.raises(ConfigError, match="reward_weights"):
        GRPOTrainer(model, reward_funcs=[count_a], args=GRPOConfig(**args, reward_weights=[1, 2]),
                    train_dataset=ROWS, processing_class=tok)
    lora = FastLanguageModel.get_peft_model(model, r=2, lora_alpha=2)
    bad = GRPOTrainer(lora, reward_funcs=[lambda prompts, completions, **_: [1.0]], args=GRPOConfig(**args),
                      train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ConfigError, match="returned 1 rewards for 4 completions"):
        bad.train()


def test_transformers_fallback_gives_the_same_loss(tiny_dir, tmp_path):
    """The transformers+PEFT path (logits, PEFT's disable_adapter for the reference) equals our decoder's."""
    out = []
    for fast in (True, False):
        model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32", fast=fast)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
        tr = _ours(model, tok, tmp_path, beta=0.1, loss_type="grpo", temperature=0.7)
        randomize_lora_b(model)  # after the trainer took the fresh adapter (the base, adapters off) as reference
        batch = _our_batch(tr)
        loss, _ = tr.micro_batch_loss(batch, int(batch["completion_mask"].sum()))
        loss.backward()
        norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
        out.append((batch["ref_logps"], float(loss), float(norm)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    assert out[0][1:] == pytest.approx(out[1][1:], rel=1e-4)


def test_conversational_prompts(tiny_dir, tmp_path, tiny_tokenizer):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "answer": "a"}]
    args = GRPOConfig(output_dir=str(tmp_path / "c"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      num_generations=2, max_completion_length=3)
    tr = GRPOTrainer(model, reward_funcs=["exact_match"], args=args, train_dataset=rows, processing_class=tok)
    want = tiny_tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert tok.decode(tr.train_examples[0]["prompt_ids"]) == want
    seen = {}

    def spy(prompts, completions, **_):
        seen["c"] = completions
        return [0.0] * len(completions)

    tr.reward_funcs, tr.reward_names = [spy], ["spy"]
    tr.reward_weights = torch.ones(1)
    tr.compute_rewards(tr.train_examples[:2], [[97, 256], [98]])
    assert seen["c"] == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    with pytest.raises(DataError, match=r"Row 0 .*prompt\[0\]"):
        GRPOTrainer(model, reward_funcs=["length"], args=args, train_dataset=[{"prompt": [{"role": "x"}]}],
                    processing_class=tok)


TRUNCATED = [[97, 98, 99], [98, 98, 98], [99, 97, 98], [100, 101, 102]] * 2  # 3 tokens, no stop token


class TruncatedTRL(trl.GRPOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(c) for c in TRUNCATED[:len(prompt_ids)]], None


class Truncated(GRPOTrainer):
    """Every completion runs to max_completion_length=3 without a stop token; counts the rollouts."""
    rollouts = 0

    def sample(self, examples, seed):
        self.rollouts += 1
        assert self.rollouts <= 10, "the step is re-sampled instead of counted"
        return [list(c) for c in TRUNCATED[:len(examples)]], [True] * len(examples)


def test_every_completion_masked_is_a_counted_step_of_loss_0(tiny_dir, tmp_path):
    """mask_truncated_completions=True and nothing ends within max_completion_length: TRL 1.16 finishes the step
    with loss 0 (and logs terminated lengths 0); we count and log it too instead of re-sampling forever."""
    from datasets import Dataset

    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    cfg = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=G,
               max_completion_length=3, mask_truncated_completions=True, max_steps=2, logging_steps=1)
    ours = Truncated(model, reward_funcs=[count_a], args=GRPOConfig(output_dir=str(tmp_path / "o"), **cfg),
                     train_dataset=ROWS, processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ours.train()
    theirs = TruncatedTRL(model=hf_model("llama", seed=0), reward_funcs=[count_a], train_dataset=Dataset.from_list(ROWS),
                          processing_class=tok, args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True,
                                                                    report_to="none", bf16=False, save_strategy="no",
                                                                    **cfg))
    theirs.train()
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert [h["loss"] for h in want] == [0.0, 0.0]  # the oracle
    assert ours.rollouts == 2 and [h["step"] for h in ours.log_history] == [1, 2]
    for h, w in zip(ours.log_history, want):
        assert h["loss"] == w["loss"] and h["grad_norm"] == 0.0
        for k in ("completions/clipped_ratio", "completions/mean_terminated_length",
                  "completions/min_terminated_length", "completions/max_terminated_length",
                  "completions/mean_length"):
            assert h[k] == pytest.approx(w[k]), k
    for n, p in model.named_parameters():  # zero gradients: AdamW moves nothing (no weight decay)
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def test_a_step_without_items_is_counted_by_the_core_for_every_objective(tiny_dir, tmp_path):
    """The guard lives in the trainer core, not in GRPO: any objective's step whose batches count no items (here
    SFT, told so through the count_items hook) is a counted, logged step of loss 0 with zero gradients."""
    from fasttune import SFTConfig, SFTTrainer

    class NothingToLearn(SFTTrainer):
        def count_items(self, batch):
            return 0

    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr = NothingToLearn(model=model, tokenizer=tok, train_dataset=[{"text": "ab ab ab"}] * 4,
                        args=SFTConfig(output_dir=str(tmp_path / "s"), per_device_train_batch_size=2, max_steps=2,
                                       learning_rate=1e-2, logging_steps=1))
    metrics = tr.train()
    assert [(h["step"], h["loss"], h["grad_norm"]) for h in tr.log_history] == [(1, 0.0, 0.0), (2, 0.0, 0.0)]
    assert metrics["global_step"] == 2 and metrics["skipped_steps"] == 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def test_terminated_lengths_match_trl(ours_and_adapter, tmp_path):
    model, tok, adapter = ours_and_adapter
    ours = _ours(model, tok, tmp_path)
    tr, _ = _trl(adapter, tok, tmp_path)
    _our_batch(ours)
    for k in ("mean", "min", "max"):
        name = f"completions/{k}_terminated_length"
        assert ours._metrics[name][-1] == pytest.approx(tr._metrics["train"][name][-1]), name


def never(prompts, completions, **_):
    return [None] * len(completions)


def test_no_reward_at_all_warns_then_stops(tiny_dir, tmp_path, caplog):
    """TRL 1.16 warns 'All reward functions returned None ...' (and trains on at loss 0); we give the same warning
    and the same losses, and stop after max_unrewarded_steps such steps in a row."""
    import logging
    import warnings

    from datasets import Dataset

    from fasttune.train.objectives.grpo import NoRewardError

    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    cfg = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=G,
               max_completion_length=3, logging_steps=1)
    args = GRPOConfig(output_dir=str(tmp_path / "n"), max_steps=10, max_unrewarded_steps=3, shuffle=False, **cfg)
    tr = Truncated(model, reward_funcs=[never], args=args, train_dataset=ROWS, processing_class=tok)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(NoRewardError, match=r"never.* 3 steps in a row.*max_unrewarded_steps"):
            tr.train()
    ours = [str(w.message) for w in seen if "All reward functions returned None" in str(w.message)]
    with caplog.at_level(logging.WARNING):
        theirs = TruncatedTRL(model=hf_model("llama", seed=0), reward_funcs=[never],
                              train_dataset=Dataset.from_list(ROWS), processing_class=tok,
                              args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                                                  bf16=False, save_strategy="no", max_steps=2,
                                                  shuffle_dataset=False, **cfg))
        theirs.train()
    said = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records  # accelerate's logger adds the rank
            if "All reward functions returned None" in r.getMessage()]
    assert len(said) == 2 and len(ours) == 3  # once per step
    assert ours[0] == said[0]  # the oracle's text, with the same first unscored completion's inputs
    want = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    assert want == [0.0, 0.0] and [h["loss"] for h in tr.log_history] == want
    with pytest.raises(ConfigError, match="max_unrewarded_steps"):
        GRPOConfig(output_dir=str(tmp_path / "n"), max_unrewarded_steps=0)


@pytest.mark.parametrize("eval_generations", [None, 2])
def test_evaluation_equals_trl(ours_and_adapter, tmp_path, eval_generations):
    """evaluate() with an eval_dataset: each eval prompt sampled num_generations_eval times and scored; eval_loss
    and the rollout metrics equal TRL 1.16's evaluate() on the same (fixed) completions, with beta > 0; training
    metrics are not disturbed; a batch that splits a group is refused."""
    from datasets import Dataset

    model, tok, adapter = ours_and_adapter
    by_prompt = {tuple(tok(r["prompt"])["input_ids"]): COMPLETIONS[G * i:G * (i + 1)] for i, r in enumerate(ROWS)}

    batch_losses = []

    class ByPromptTRL(trl.GRPOTrainer):  # TRL's eval sampler shuffles the prompts: completions follow the prompt
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            seen = {}
            out = []
            for ids in prompt_ids:
                k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
                out.append(list(by_prompt[tuple(ids)][k]))
            return out, None

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            out = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            batch_losses.append(float(out[0]))
            return out

    cfg = dict(beta=0.1, temperature=0.8, num_generations=G, max_completion_length=6, per_device_eval_batch_size=G,
               num_generations_eval=eval_generations)
    ours = FixedCompletions(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS,
                            args=GRPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=G, **cfg))
    ours._metrics["reward"].append(123.0)  # a training window in progress
    got = ours.evaluate()
    assert ours._metrics["reward"] == [123.0]
    theirs = ByPromptTRL(model=peft_twin("llama", adapter), reward_funcs=list(REWARDS), processing_class=tok,
                         train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS),
                         args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=G,
                                             use_cpu=True, report_to="none", bf16=False, **cfg))
    want = theirs.evaluate()
    # TRL's batches' losses, averaged (transformers weights each batch by its guess of the batch size, which for
    # GRPO's raw rows is the length of the first string column, here the answers: 2 and 1)
    assert got["eval_loss"] == pytest.approx(sum(batch_losses) / len(batch_losses), rel=1e-5, abs=1e-7)
    for key in ("eval_reward", "eval_reward_std", "eval_rewards/count_a/mean",
                "eval_rewards/exact_match/mean", "eval_completions/mean_length", "eval_kl"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(ConfigError, match="per_device_eval_batch_size x ranks = 5 .* num_generations_eval="):
        FixedCompletions(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS, eval_dataset=ROWS,
                         args=GRPOConfig(output_dir=str(tmp_path / "x"), per_device_train_batch_size=G,
                                         **{**cfg, "per_device_eval_batch_size": 5}))


async def async_length(prompts, completions, **_):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


class AsyncCountB:
    """An async callable object (its __call__ is the coroutine function)."""

    async def __call__(self, prompts, completions, **_):
        await asyncio.sleep(0)
        return [float(c.count("b")) for c in completions]


def test_async_reward_functions_equal_trl(ours_and_adapter, tmp_path):
    """Async reward functions (a coroutine function and an async callable object) are awaited together, on one
    event loop kept across steps, as TRL runs them: the advantages and reward metrics equal TRL's."""
    model, tok, adapter = ours_and_adapter
    rewards = [count_a, async_length, AsyncCountB()]
    ours = _ours(model, tok, tmp_path, reward_funcs=rewards)
    tr, want = _trl(adapter, tok, tmp_path, rewards)
    got = _our_batch(ours)
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-6, atol=1e-6)
    assert got["advantages"].abs().sum() > 0
    for name in ("reward", "rewards/async_length/mean"):
        assert ours._metrics[name][-1] == pytest.approx(tr._metrics["train"][name][-1], rel=1e-6), name
    again = _our_batch(ours)  # a second step on the same loop
    torch.testing.assert_close(again["advantages"], got["advantages"])


def test_reward_functions_get_trls_trainer_state_and_loggers(tiny_dir, tmp_path):
    """As TRL passes them: trainer_state (global_step counts the finished steps), log_metric (averaged into the log
    entry) and log_extra (accepted)."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    seen = []

    def curriculum(prompts, completions, trainer_state, log_metric, log_extra, **_):
        seen.append(trainer_state.global_step)
        log_metric("curriculum/step", trainer_state.global_step)
        log_extra("note", ["x"] * len(completions))
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "s"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      num_generations=4, max_completion_length=3, max_steps=2, logging_steps=1, shuffle=False)
    trainer = GRPOTrainer(model, reward_funcs=[curriculum], args=args, train_dataset=ROWS, processing_class=tok)
    trainer.train()
    assert seen == [0, 1]
    assert [h["curriculum/step"] for h in trainer.log_history if "loss" in h] == [0.0, 1.0]


def tagged(prompts, completions, log_extra, **_):
    """A reward (the completion's length) that adds a column to the completions table through TRL's log_extra."""
    log_extra("tag", [f"t{i}" for i in range(len(completions))])
    return [float(len(c)) for c in completions]


def test_log_completions_table_equals_trls(ours_and_adapter, tmp_path):
    """log_completions: the kept table of a step (prompts, completions, one column per reward, the log_extra
    column, advantages) equals TRL's `_logs` for the same fixed completions."""
    model, tok, adapter = ours_and_adapter
    rewards = [count_a, tagged]
    ours = _ours(model, tok, tmp_path, reward_funcs=rewards, log_completions=True)
    tr, _ = _trl(adapter, tok, tmp_path, rewards, log_completions=True)
    examples = [ours.train_examples[i] for i in range(len(COMPLETIONS))]
    ours.score(examples, COMPLETIONS, [256 not in c for c in COMPLETIONS], [len(COMPLETIONS)], across_ranks=True)
    got, want = ours._completions.table, tr._logs
    assert got["prompt"] == list(want["prompt"]) and got["completion"] == list(want["completion"])
    for name in ("count_a", "tagged"):
        assert got[name] == pytest.approx(list(want["rewards"][name]))
    assert got["tag"] == list(want["extra"]["tag"])
    assert got["advantage"] == pytest.approx(list(want["advantages"]), abs=1e-6)
    assert list(got) == ["prompt", "completion", "count_a", "tagged", "tag", "advantage"]


def test_log_completions_prints_and_writes_each_logged_step(ours_and_adapter, tmp_path, capsys):
    import pandas as pd

    model, tok, _ = ours_and_adapter
    ours = _ours(model, tok, tmp_path, reward_funcs=[count_a, tagged], log_completions=True,
                 num_completions_to_print=3, max_steps=2, max_completion_length=4, learning_rate=1e-3)
    ours.train()
    assert "Step 1" in capsys.readouterr().out
    for step in (1, 2):
        frame = pd.read_parquet(tmp_path / "ours" / "completions" / f"completions_{step:05d}.parquet")
        assert list(frame.columns) == ["step", "prompt", "completion", "count_a", "tagged", "tag", "advantage"]
        assert len(frame) == len(COMPLETIONS) and set(frame["step"]) == {step}
        assert frame["tagged"].tolist() == [len(c) for c in frame["completion"]]
    with pytest.raises(ConfigError, match="num_completions_to_print=0"):
        GRPOConfig(output_dir=str(tmp_path / "e"), num_completions_to_print=0)


# A Qwen3-style switch: with enable_thinking false the generation prompt carries an empty think block
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                     "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
CHAT_ROWS = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]


def test_chat_template_kwargs_reach_prompts_as_in_trl(ours_and_adapter, tmp_path):
    import copy

    from datasets import Dataset

    model, tok, adapter = ours_and_adapter
    tok = copy.deepcopy(tok)
    tok.chat_template = THINKING_TEMPLATE
    kwargs = {"enable_thinking": False}
    ours = GRPOTrainer(model, reward_funcs=[count_a], processing_class=tok, train_dataset=CHAT_ROWS, args=GRPOConfig(
        output_dir=str(tmp_path / "ours"), shuffle=False, per_device_train_batch_size=len(COMPLETIONS),
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=6, chat_template_kwargs=kwargs))
    assert "</think>" in tok.decode(ours.train_examples[0]["prompt_ids"])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(COMPLETIONS),
                          gradient_accumulation_steps=1, num_generations=G, max_completion_length=6, use_cpu=True,
                          report_to="none", bf16=False, chat_template_kwargs=kwargs)
    tr = FixedCompletionsTRL(model=peft_twin("llama", adapter), reward_funcs=[count_a], args=args,
                             train_dataset=Dataset.from_list(CHAT_ROWS), processing_class=tok)
    want = tr._generate_and_score_completions([row for row in CHAT_ROWS for _ in range(G)])
    got = _our_batch(ours)
    width = want["prompt_ids"].shape[1]
    torch.testing.assert_close(got["input_ids"][:, :width], want["prompt_ids"])
    with pytest.raises(ConfigError, match="chat_template_kwargs=.*not valid JSON"):
        GRPOConfig(output_dir=str(tmp_path / "e"), chat_template_kwargs="{enable_thinking: no")
    assert GRPOConfig(output_dir=str(tmp_path / "e"), chat_template_kwargs='{"enable_thinking": false}') \
        .chat_template_kwargs == kwargs  # a CLI flag's JSON


def test_sampling_settings_reach_generate(tiny_dir, tmp_path, monkeypatch):
    """min_p and repetition_penalty go to generate() as TRL hands them to its generation config, and
    generation_kwargs override them (here top_k and max_new_tokens)."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    seen, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: seen.append(k) or real(*a, **k))
    args = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      num_generations=4, max_completion_length=5, max_steps=1, min_p=0.1, repetition_penalty=1.3,
                      generation_kwargs={"top_k": 7, "max_new_tokens": 2})
    tr = GRPOTrainer(model, reward_funcs=[count_a], args=args, train_dataset=ROWS, processing_class=tok)
    tr.train()
    got = seen[0]
    assert (got["min_p"], got["repetition_penalty"], got["top_k"], got["max_new_tokens"]) == (0.1, 1.3, 7, 2)
    assert tr.log_history[0]["completions/max_length"] <= 2
    for bad, match in ((dict(min_p=1.5), "min_p=1.5"), (dict(repetition_penalty=0), "repetition_penalty=0"),
                       (dict(generation_kwargs=[1]), "generation_kwargs="),
                       (dict(importance_sampling_level="seq"), "importance_sampling_level='seq'"),
                       (dict(top_entropy_quantile=1.5), "top_entropy_quantile=1.5"),
                       (dict(multi_objective_aggregation="mean"), "multi_objective_aggregation='mean'.*normalize_then"),
                       (dict(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1),
                        "entropy_coef_min=0.5")):
        with pytest.raises(ConfigError, match=match):
            GRPOConfig(output_dir=str(tmp_path / "e"), **bad)


@pytest.mark.parametrize("loss_type,num_iterations", [("dapo", 1), ("grpo", 1), ("dapo", 2)])
def test_generation_batch_over_two_steps_equals_trl(ours_and_adapter, tmp_path, loss_type, num_iterations,
                                                    monkeypatch):
    """steps_per_generation=2 with gradient_accumulation_steps=1: one generation batch (both prompts' groups) feeds
    two optimizer steps (then again with num_iterations=2); the second step's ratios use the log-probs kept at
    sampling time, and dapo's normaliser is the generation's tokens / 2, as in TRL. Every step's loss, grad norm and
    the rollout's reward equal TRL's. (TRL shuffles the generation batch before cutting it into micro-batches, from
    the global RNG; fasttune keeps the sampled order, so TRL's shuffle is made the identity here.)"""
    import trl.trainer.grpo_trainer as trl_grpo

    monkeypatch.setattr(trl_grpo, "shuffle_sequence_dict", lambda batch: batch)
    _, tok, adapter = ours_and_adapter
    steps = 2 * num_iterations
    cfg = dict(beta=0.0, loss_type=loss_type, temperature=0.8, learning_rate=5e-2, max_grad_norm=1.0,
               max_steps=steps, steps_per_generation=2, num_iterations=num_iterations)
    ours, got, want = _train_with_trl(adapter, tok, tmp_path, 1, cfg, FixedCompletionsTRL)
    assert ours.generation_steps == 2 and ours.keeps_old_logps
    assert len(got) == len(want) == steps
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-4, abs=1e-6)
    assert [h["grad_norm"] for h in got] == pytest.approx([h["grad_norm"] for h in want], rel=1e-4)
    assert got[0]["reward"] == pytest.approx(want[0]["reward"], rel=1e-6)


def _train_with_trl(adapter, tok, tmp_path, ga: int, cfg: dict, trl_cls):
    """Our FixedCompletions trainer and TRL's `trl_cls` trained on ROWS from the same adapter with `cfg` and
    gradient_accumulation_steps=ga: (our trainer, our log entries, TRL's log entries with a loss)."""
    from datasets import Dataset

    model, _ = FastLanguageModel.from_pretrained(str(adapter), dtype="float32")
    ours = FixedCompletions(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS, args=GRPOConfig(
        output_dir=str(tmp_path / "ours"), per_device_train_batch_size=G, gradient_accumulation_steps=ga,
        num_generations=G, max_completion_length=6, shuffle=False, **cfg))
    ours.train()
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=G,
                          gradient_accumulation_steps=ga, num_generations=G, max_completion_length=6, use_cpu=True,
                          report_to="none", bf16=False, shuffle_dataset=False, logging_steps=1, save_strategy="no",
                          **cfg)
    theirs = trl_cls(model=peft_twin("llama", adapter), reward_funcs=list(REWARDS), args=args,
                     train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    theirs.train()
    return ours, ours.log_history, [h for h in theirs.state.log_history if "loss" in h]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_generation_batches_in_one_step_equal_trl(ours_and_adapter, tmp_path, loss_type, monkeypatch):
    """steps_per_generation=1 with gradient_accumulation_steps=2: each optimizer step samples and scores two
    generation batches (one prompt's group each, completions of different lengths), dapo normalising each by its own
    completion tokens x 2, as TRL does. Both steps' losses and grad norms and the rewards equal TRL's."""
    import trl.trainer.grpo_trainer as trl_grpo

    monkeypatch.setattr(trl_grpo, "shuffle_sequence_dict", lambda batch: batch)

    class Cycling(FixedCompletionsTRL):  # TRL samples one group a call: the fixed completions in turn
        calls = 0

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            start = (self.calls * len(prompt_ids)) % len(COMPLETIONS)
            self.calls += 1
            return [list(c) for c in COMPLETIONS[start:start + len(prompt_ids)]], None

    _, tok, adapter = ours_and_adapter
    cfg = dict(beta=0.0, loss_type=loss_type, temperature=0.8, learning_rate=5e-2, max_grad_norm=1.0, max_steps=2,
               steps_per_generation=1)
    ours, got, want = _train_with_trl(adapter, tok, tmp_path, 2, cfg, Cycling)
    assert (ours.generation_steps, ours.generations_per_step, ours.keeps_old_logps) == (1, 2, False)
    assert len(got) == len(want) == 2
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-4, abs=1e-6)
    assert [h["grad_norm"] for h in got] == pytest.approx([h["grad_norm"] for h in want], rel=1e-4)
    assert [h["reward"] for h in got] == pytest.approx([h["reward"] for h in want], rel=1e-6)


def test_generation_batch_settings(tiny_dir, tmp_path):
    """TRL's steps_per_generation / generation_batch_size: whole optimizer steps per generation batch, or a whole share
    of one step (num_iterations=1, whole groups), else refused naming the values that fit."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32")
    common = dict(output_dir=str(tmp_path / "g"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  num_generations=4, max_completion_length=4)
    for kw, steps in ((dict(steps_per_generation=2), 1), (dict(generation_batch_size=8), 1),
                      (dict(steps_per_generation=6), 3), (dict(generation_batch_size=16), 2), ({}, 1)):
        tr = GRPOTrainer(model, reward_funcs=[count_a], args=GRPOConfig(**common, **kw), train_dataset=ROWS,
                         processing_class=tok)
        assert tr.generation_steps == steps and tr.keeps_old_logps == (steps > 1)
    for kw, runs in ((dict(steps_per_generation=1), 2), (dict(generation_batch_size=4), 2)):  # two in one step
        tr = GRPOTrainer(model, reward_funcs=[count_a], args=GRPOConfig(**common, **kw), train_dataset=ROWS,
                         processing_class=tok)
        assert (tr.generation_steps, tr.generations_per_step, tr.keeps_old_logps) == (1, runs, False)
    for kw, match in ((dict(steps_per_generation=3), r"steps_per_generation=3 is not supported.*multiple or a "
                                                      r"divisor of gradient_accumulation_steps=2 .*multiple of 8"),
                      (dict(steps_per_generation=1, num_iterations=2), "num_iterations=2 is not supported"),
                      (dict(steps_per_generation=1, per_device_train_batch_size=2),
                       r"2 completions a rank, which must be whole groups of num_generations=4"),
                      (dict(generation_batch_size=12), r"generation_batch_size=12 \(3 micro-batches a rank\)"),
                      (dict(generation_batch_size=6), "multiple of per_device_train_batch_size x ranks = 4")):
        with pytest.raises(ConfigError, match=match):
            GRPOTrainer(model, reward_funcs=[count_a], args=GRPOConfig(**{**common, **kw}), train_dataset=ROWS,
                        processing_class=tok)
    with pytest.raises(ConfigError, match="give one"):
        GRPOConfig(**common, steps_per_generation=2, generation_batch_size=8)


def test_adaptive_entropy_equals_trl(ours_and_adapter, tmp_path):
    """use_adaptive_entropy (Skywork-OR1's controller) over three steps of two micro-batches: no bonus in the first
    step, then the coefficient moves by entropy_coef_delta a step towards entropy_target; each step's loss, grad norm,
    entropy, entropy_coef and policy_loss equal TRL's train() on the same completions, and a run resumed after step 2
    continues the controller. The target sits above the
    tiny model's entropy (~5.5 nats of 257 tokens), so the coefficient rises and the bonus acts."""
    _, tok, adapter = ours_and_adapter
    steps = 3
    # Adam's eps 1 makes its step lr * g / (|g| + 1): the rounding of near-zero gradients does not decide it
    cfg = dict(beta=0.0, loss_type="dapo", temperature=0.8, learning_rate=0.2, adam_epsilon=1.0, max_grad_norm=1.0,
               max_steps=steps, entropy_coef=0.02, use_adaptive_entropy=True, entropy_target=9.0, entropy_coef_delta=0.03,
               entropy_coef_max=0.07)

    def trainer():
        model, _ = FastLanguageModel.from_pretrained(str(adapter), dtype="float32")
        return FixedCompletions(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS,
                                args=GRPOConfig(output_dir=str(tmp_path / "ours"), per_device_train_batch_size=G,
                                                gradient_accumulation_steps=2, num_generations=G,
                                                max_completion_length=6, shuffle=False, save_steps=2, **cfg))
    ours = trainer()
    ours.train()
    got = ours.log_history
    # resumed after step 2, the controller goes on from its saved coefficient and last entropy (TRL keeps both)
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-2"))
    for key in ("loss", "entropy_coef"):
        assert [h[key] for h in resumed.log_history] == pytest.approx([h[key] for h in got], rel=1e-6), key
    theirs = _trl_trainer(adapter, tok, tmp_path, shuffle_dataset=False, logging_steps=1, save_strategy="no",
                          per_device_train_batch_size=G, gradient_accumulation_steps=2, **cfg)
    theirs.train()
    want = [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == steps
    assert [h["entropy_coef"] for h in got] == pytest.approx([0.05, 0.07, 0.07])  # capped at entropy_coef_max
    assert any(abs(h["policy_loss"]) > 1e-3 for h in got)
    for key in ("loss", "grad_norm", "entropy", "entropy_coef", "policy_loss"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-4, abs=1e-6), key


def _exact_logps(model, batch, temperature):
    """The completion tokens' log-probs from the fp64 product of the model's (bf16) hidden states and head weight."""
    n = batch["completion_mask"].shape[1]
    with torch.no_grad():
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], positions)[:, -n - 1:-1]
        z = hidden.double() @ model.lm_head.weight.double().t() / temperature
        picked = z.log_softmax(-1).gather(-1, batch["input_ids"][:, -n:, None]).squeeze(-1)
    return picked * batch["completion_mask"]


def test_cast_lm_head_to_fp32(tiny_dir, tmp_path):
    """TRL's cast_lm_head_to_fp32 on a bf16 model: the old, reference and policy log-probs come from the head's fp32
    product (equal to fp64's of the same bf16 values, where the default's bf16 logits are off), generation's logits
    are fp32, a step trains; refused on the transformers fallback."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="bfloat16")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    tr = _ours(model, tok, tmp_path, beta=0.1, temperature=0.7, cast_lm_head_to_fp32=True)
    assert model.fp32_head
    batch = _our_batch(tr)
    mask = batch["completion_mask"].bool()
    want = _exact_logps(model, batch, 0.7)
    torch.testing.assert_close(batch["ref_logps"][mask].double(), want[mask], rtol=1e-5, atol=1e-5)
    got = tr.completion_logps(batch["input_ids"], batch["attention_mask"], mask.shape[1])
    torch.testing.assert_close(got[mask].double(), want[mask], rtol=1e-5, atol=1e-5)
    model.fp32_head = False  # the default: logits rounded to bf16
    rounded = tr.completion_logps(batch["input_ids"], batch["attention_mask"], mask.shape[1])
    assert (rounded[mask].double() - want[mask]).abs().max() > 1e-4
    model.fp32_head = True
    assert model(batch["input_ids"][:, :3]).logits.dtype == torch.float32
    tr.train()
    assert tr.log_history[-1]["loss"] == tr.log_history[-1]["loss"]  # finite, not NaN
    fallback, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32", fast=False)
    fallback = FastLanguageModel.get_peft_model(fallback, r=4, lora_alpha=8)
    with pytest.raises(ConfigError, match="cast_lm_head_to_fp32=True needs a model on fasttune's decoder"):
        _ours(fallback, tok, tmp_path, cast_lm_head_to_fp32=True)
    streamed, tok = FastLanguageModel.from_pretrained(str(tiny_dir), dtype="float32", offload_lm_head=True)
    streamed = FastLanguageModel.get_peft_model(streamed, r=4, lora_alpha=8)
    with pytest.raises(ConfigError, match="not implemented with offload_lm_head=True"):
        _ours(streamed, tok, tmp_path, cast_lm_head_to_fp32=True)


def test_ratio_metrics_are_micro_batch_means_as_trl(ours_and_adapter, tmp_path, monkeypatch):
    """kl, entropy and the clip ratios are logged as TRL logs them with gradient accumulation: each micro-batch's
    mean over its tokens, averaged over the step's micro-batches (the two here hold 15 and 10 completion tokens, so a
    token-weighted mean differs). Two steps of two micro-batches against TRL's train(), TRL's shuffle of the
    generation batch made the identity (fasttune keeps the sampled order)."""
    import trl.trainer.grpo_trainer as trl_grpo

    monkeypatch.setattr(trl_grpo, "shuffle_sequence_dict", lambda batch: batch)
    _, tok, adapter = ours_and_adapter
    cfg = dict(beta=0.1, loss_type="grpo", temperature=0.8, learning_rate=0.2, adam_epsilon=1.0, max_grad_norm=1.0,
               max_steps=2)
    model, _ = FastLanguageModel.from_pretrained(str(adapter), dtype="float32")
    ours = FixedCompletions(model, reward_funcs=REWARDS, processing_class=tok, train_dataset=ROWS, args=GRPOConfig(
        output_dir=str(tmp_path / "ours"), per_device_train_batch_size=G, gradient_accumulation_steps=2,
        num_generations=G, max_completion_length=6, shuffle=False, **cfg))
    ours.train()
    theirs = _trl_trainer(adapter, tok, tmp_path, shuffle_dataset=False, logging_steps=1, save_strategy="no",
                          per_device_train_batch_size=G, gradient_accumulation_steps=2, **cfg)
    theirs.train()
    got, want = ours.log_history, [h for h in theirs.state.log_history if "loss" in h]
    assert len(got) == len(want) == 2 and got[1]["kl"] > 1e-4
    for key in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-4, abs=1e-7), key


def test_max_prompt_length_keeps_the_prompts_last_tokens(ours_and_adapter, tmp_path):
    """Older TRL's GRPOConfig(max_prompt_length=...), which the peer's GRPO notebooks pass (TRL 1.x dropped it): a
    longer text prompt keeps its last tokens, reward functions still get the whole prompt; None keeps it whole."""
    model, tok, _ = ours_and_adapter
    whole = _ours(model, tok, tmp_path / "a")
    cut = _ours(model, tok, tmp_path / "b", max_prompt_length=3)
    for full, short in zip(whole.train_examples, cut.train_examples):
        assert short["prompt_ids"] == full["prompt_ids"][-3:] and short["prompt"] == full["prompt"]
    assert max(len(ex["prompt_ids"]) for ex in whole.train_examples) > 3
    with pytest.raises(ConfigError, match="max_prompt_length=0 is invalid"):
        GRPOConfig(output_dir=str(tmp_path / "c"), max_prompt_length=0)
