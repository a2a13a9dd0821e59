"""Unit tests of train/objectives/grpo_loss.py, one per loss type, on hand-sized tensors: each normaliser is the
formula the module docstring states (TRL 1.16's), and the properties that make each type what it is hold (dapo is
split-invariant, grpo weighs completions equally, bnpo is a token mean, dr_grpo divides by a constant)."""
import pytest
import torch

from fasttune.train.objectives.grpo_loss import group_advantages, off_policy_mask, per_token_loss, reduce_loss

# Two completions: 3 tokens (loss 1, 2, 3) and 1 token (loss 10) of max_completion_length 4.
LOSS = torch.tensor([[1.0, 2.0, 3.0, 7.0], [10.0, 5.0, 5.0, 5.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_dapo_is_the_token_mean_of_the_whole_step_for_any_split():
    assert reduce_loss(LOSS, MASK, "dapo", num_items=4, steps=1, max_completion_length=4) == pytest.approx(16 / 4)
    halves = sum(reduce_loss(LOSS[i:i + 1], MASK[i:i + 1], "dapo", num_items=4, steps=2, max_completion_length=4)
                 for i in range(2))
    assert halves == pytest.approx(16 / 4)  # the same number split over two micro-batches


def test_grpo_weighs_each_completion_equally():
    # completion means 2 and 10, their mean 6, over 2 micro-batches: 3
    assert reduce_loss(LOSS, MASK, "grpo", num_items=4, steps=2, max_completion_length=4) == pytest.approx(3.0)


def test_bnpo_is_the_micro_batch_token_mean_over_steps():
    assert reduce_loss(LOSS, MASK, "bnpo", num_items=99, steps=2, max_completion_length=4) == pytest.approx(16 / 4 / 2)


def test_dr_grpo_divides_by_completions_times_max_length():
    assert reduce_loss(LOSS, MASK, "dr_grpo", num_items=99, steps=1, max_completion_length=4) == pytest.approx(16 / 8)


def test_per_token_loss_clips_the_ratio_and_adds_the_k3_kl():
    logps, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    loss, ratio, kl = per_token_loss(logps, old, torch.tensor([1.0]), 0.2, 0.28, beta=0.0, ref_logps=None)
    assert kl is None and torch.allclose(ratio, torch.tensor([[1.5, 0.5]]))
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5]]))  # min(r A, clip(r) A) with A = 1
    ref = torch.zeros(1, 2)
    loss_kl, _, kl = per_token_loss(logps, old, torch.tensor([1.0]), 0.2, 0.28, beta=0.1, ref_logps=ref,
                                    bias_correction_kl=False)
    want = torch.exp(ref - logps) - (ref - logps) - 1
    assert torch.allclose(kl, want) and torch.allclose(loss_kl, loss + 0.1 * want)


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([[1.0], [3.0], [0.0], [0.0]])  # two groups of two
    adv, summed, std = group_advantages(rewards, torch.ones(1), num_generations=2, scale_rewards="group")
    assert torch.allclose(summed, rewards[:, 0])
    s = torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(adv, torch.tensor([-1 / (s + 1e-4), 1 / (s + 1e-4), 0.0, 0.0]))
    assert torch.allclose(std, torch.tensor([s, s, 0.0, 0.0]))


def test_off_policy_mask_drops_negative_advantage_completions_that_drifted():
    """DeepSeek-V3.2 eq. 9: keep a completion when A >= 0 or its mean KL(sampling || policy) over its tokens is <=
    delta; padding does not count, a NaN token (unscorable) adds 0."""
    logps = torch.zeros(4, 3)
    sampling = torch.tensor([[0.9, 0.9, 5.0], [0.9, 0.9, 5.0], [0.2, 0.2, 0.2], [float("nan"), 0.9, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([-1.0, 0.0, -1.0, -1.0])
    kept = off_policy_mask(adv, logps, sampling, mask, threshold=0.5)
    # mean KLs 0.9 (the padded 5.0 ignored), 0.9, 0.2, 0.45 (the NaN as 0)
    assert kept.shape == (4, 1) and kept.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert off_policy_mask(adv, logps, sampling, mask, threshold=0.1).flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
